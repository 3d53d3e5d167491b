"""SmolLM2-135M-Instruct's GGUF (Q4_1) as a Hugging Face directory: the conversion behind
examples/smollm2.py, which caches its result.

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
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

# What SmolLM2-135M is; the conversion refuses to cache anything else.
EXPECTED = dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                num_hidden_layers=30, vocab_size=49152, intermediate_size=1536)


def convert_gguf(source: Path, out: Path) -> dict:
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
    if rope_theta(saved) != meta["rope_theta"] or saved.get("dtype") != str(dtype)[6:]:
        raise RuntimeError(f"config.json came out wrong: rope theta {rope_theta(saved)}, "
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


def rope_theta(cfg) -> float | None:
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
    if rope_theta(cfg) != theta:
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
