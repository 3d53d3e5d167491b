"""What ``preprocess_weights`` hands to ``load()``: a rank's header (name → shape, dtype) transformed
as TensorRT-LLM 1.x transforms the tensors, on shapes and dtypes only.

Read in NVIDIA/TensorRT-LLM ``tensorrt_llm/models/modeling_utils.py``:

- ``preprocess_weights`` → ``process_kv_scaling_factor``: ``k_cache_scaling_factor`` +
  ``v_cache_scaling_factor`` merge into ``kv_cache_scaling_factor`` (their max); a
  ``kv_cache_rcp_scaling_factor`` (the reciprocal) is added wherever one is missing;
- ``preprocess_perlayer_weights``, W4A16_AWQ / W4A8_AWQ: every int8 ``*weight`` is transposed
  (``[out/2, in]`` → ``[in, out/2]``, packed int4) through ``preprocess_weights_for_mixed_gemm``
  (same shape) and viewed as 16-bit words of the model dtype (bfloat16 for a bfloat16 model,
  float16 otherwise) → ``[in, out/4]``; ``*weights_scaling_factor`` transposed (``[out, in/g]`` →
  ``[in/g, out]``) and cast to the model dtype; ``*prequant_scaling_factor`` reshaped to
  ``[1, in]`` (a 2-D MoE one keeps its first row), dtype unchanged;
- W4A8_AWQ, after the AWQ step: per ``*weights_scaling_factor``, its ``activation_scaling_factor``
  and ``weights_scaling_factor_2`` are popped (a missing one: KeyError), the group scales divided
  by the second (float16 viewed as the model dtype: the same shape and dtype name), the pre-quant
  scale divided in place by the first (its dtype kept), ``alpha`` [1] float32 added and the
  activation scale put back (1.1/1.2-era tree; a column linear declares none: a warning);
- FP8: int8 ``*weight`` viewed as float8_e4m3fn; a non-FP8 ``lm_head.weight`` loses
  ``lm_head.weights_scaling_factor`` / ``activation_scaling_factor``;
- FP8_PER_CHANNEL_PER_TOKEN: int8 ``*weight`` viewed as float8_e4m3fn; ``assert
  weights['lm_head.weight'].dtype == str_dtype_to_torch(model_config.dtype)`` (a bare
  AssertionError: the head must be written in the model dtype); ``lm_head.weights_scaling_factor``
  / ``activation_scaling_factor`` dropped;
- NVFP4: see :func:`nvfp4` (the block scales renamed and interleaved, the globals renamed,
  ``alpha`` added);
- W8A16 / W4A16: ``models/convert_utils.py`` ``weight_only_quantize_dict`` quantizes every
  non-int8 tensor whose name contains ``qkv.weight``, ``dense.weight``, ``fc.weight``,
  ``proj.weight`` or ``gate.weight`` (and matches no ``exclude_modules`` pattern, fnmatch on the
  tensor name): ``weight_only_quantize`` transposes the last two dims and
  ``symmetric_quantize_last_axis_of_batched_matrix`` gives int8 ``[..., in, out]`` (int4:
  ``[..., in, out/2]``) and a ``per_channel_scale`` ``[..., out]`` in the weight's dtype.
"""
from __future__ import annotations

import fnmatch

Header = dict[str, tuple[tuple[int, ...], str]]

WEIGHT_ONLY_NAMES = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight", "gate.weight")


def kv_scales(h: Header) -> None:
    for name in [n for n in h if n.endswith(".k_cache_scaling_factor")]:
        v = name.replace("k_cache_scaling_factor", "v_cache_scaling_factor")
        if v in h:
            h[name.replace("k_cache_scaling_factor", "kv_cache_scaling_factor")] = h.pop(name)
            del h[v]
    for name in [n for n in h if n.endswith(".kv_cache_scaling_factor")]:
        h.setdefault(name.replace("kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor"), h[name])


def _t(shape):
    return (*shape[:-2], shape[-1], shape[-2])


def awq(h: Header, config: dict, scheme) -> None:
    word = "bfloat16" if config.get("dtype") == "bfloat16" else "float16"
    for name, (shape, dtype) in list(h.items()):
        if name.endswith("weight") and dtype == "int8" and len(shape) >= 2:
            t = _t(shape)
            h[name] = ((*t[:-1], t[-1] // 2), word)  # int8 pairs viewed as 16-bit words
        elif name.endswith("weights_scaling_factor") and len(shape) >= 2:
            h[name] = (_t(shape), config["dtype"])
        elif name.endswith("prequant_scaling_factor"):
            h[name] = ((1, shape[-1]), dtype)


def w4a8_awq(h: Header, config: dict, scheme) -> str | None:
    awq(h, config, scheme)
    for name in [n for n in h if n.endswith(".weights_scaling_factor")]:
        act = name.replace("weights_scaling_factor", "activation_scaling_factor")
        wsf2 = name.replace("weights_scaling_factor", "weights_scaling_factor_2")
        for needed in (act, wsf2):
            if needed not in h:
                return f"KeyError in preprocess_weights (W4A8_AWQ): {needed} is missing"
        h.pop(wsf2)
        h[name.replace("weights_scaling_factor", "alpha")] = ((1,), "float32")
    return None


def fp8(h: Header, config: dict, scheme) -> None:
    for name, (shape, dtype) in list(h.items()):
        if name.endswith("weight") and dtype == "int8":
            h[name] = (shape, "float8_e4m3fn")
    if "lm_head.weight" in h and h["lm_head.weight"][1] != "float8_e4m3fn":
        h.pop("lm_head.weights_scaling_factor", None)
        h.pop("lm_head.activation_scaling_factor", None)


def fp8_rowwise(h: Header, config: dict, scheme) -> str | None:
    for name, (shape, dtype) in list(h.items()):
        if name.endswith("weight") and dtype == "int8":
            h[name] = (shape, "float8_e4m3fn")
    h.pop("lm_head.weights_scaling_factor", None)
    h.pop("lm_head.activation_scaling_factor", None)
    if "lm_head.weight" in h and h["lm_head.weight"][1] != config.get("dtype"):
        return (f"AssertionError in preprocess_weights: lm_head.weight is "
                f"{h['lm_head.weight'][1]}, FP8_PER_CHANNEL_PER_TOKEN asserts the model dtype "
                f"{config.get('dtype')}")
    return None


def weight_only(h: Header, config: dict, scheme) -> None:
    bits = scheme.bits
    exclude = (config.get("quantization") or {}).get("exclude_modules") or [
        "*shared_expert_gate.weight"]
    for name, (shape, dtype) in list(h.items()):
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if any(n in name for n in WEIGHT_ONLY_NAMES) and dtype != "int8" and len(shape) >= 2:
            t = _t(shape)
            h[name] = ((*t[:-1], t[-1] * bits // 8), "int8")
            h[name.replace(".weight", ".per_channel_scale")] = ((*shape[:-2], shape[-2]), dtype)


def nvfp4(h: Header, config: dict, scheme) -> None:
    """NVFP4: ``*weights_scaling_factor`` [out, in/16] becomes ``*weights_block_scaling_factor``
    and ``*weights_block_scaling_factor_interleaved`` ([pad_up(out, 128), pad_up(in/16, 4)],
    ``block_scale_interleave``: quantize/recipes/nvfp4/weights.py restates it);
    ``*weights_scaling_factor_2`` → ``*weights_global_scaling_factor``,
    ``*activation_scaling_factor`` → ``*activation_global_scaling_factor``, and ``*alpha`` (their
    product, the broadcast of both shapes: [E] for MoE experts) beside every weight global; the
    weight is untouched. MoE experts' block scales [E, out, in/16] are interleaved per expert
    (``block_scale_interleave`` takes a leading experts dim: NVIDIA/TensorRT-LLM #6073, in 1.2)."""
    for name, (shape, dtype) in list(h.items()):
        if name.endswith("weights_scaling_factor") and len(shape) in (2, 3):
            base = name[: -len("weights_scaling_factor")] + "weights_block_scaling_factor"
            h[base] = h.pop(name)
            h[base + "_interleaved"] = ((*shape[:-2], -(-shape[-2] // 128) * 128,
                                        -(-shape[-1] // 4) * 4), dtype)
        elif name.endswith("weights_scaling_factor_2"):
            h[name[: -len("weights_scaling_factor_2")] + "weights_global_scaling_factor"] = h.pop(name)
        elif name.endswith("activation_scaling_factor"):
            h[name[: -len("activation_scaling_factor")] + "activation_global_scaling_factor"] = h.pop(name)
    for name in [n for n in h if n.endswith("weights_global_scaling_factor")]:
        act = name.replace("weights_global_scaling_factor", "activation_global_scaling_factor")
        if act in h:
            shape = _broadcast(tuple(h[name][0]), tuple(h[act][0]))
            h[name.replace("weights_global_scaling_factor", "alpha")] = (shape, h[act][1])


def _broadcast(a: tuple, b: tuple) -> tuple:
    """The shape of ``a * b`` (torch's broadcasting: right-aligned, 1 stretches)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(x if y == 1 else y for x, y in zip(a, b))


TRANSFORMS = {"awq": awq, "w4a8_awq": w4a8_awq, "fp8": fp8, "fp8_rowwise": fp8_rowwise,
              "weight_only": weight_only, "nvfp4": nvfp4, None: None}


def preprocess(header: Header, config: dict, scheme) -> tuple[Header, str | None]:
    """(the header as ``load()`` receives it (a new dict), the error preprocess_weights itself
    would raise or None)."""
    h = dict(header)
    kv_scales(h)
    step = TRANSFORMS[scheme.preprocess]
    error = step(h, config, scheme) if step is not None else None
    return h, error
