"""Pre-quantized fp8 inputs (compressed-tensors ``float-quantized``: per-tensor or per-channel
e4m3 weight scales) written as TensorRT-LLM's ``FP8_PER_CHANNEL_PER_TOKEN`` without calibration.

Why that format: its linears (``Fp8RowwiseLinear`` / ``Fp8RowwiseRowLinear``,
``tensorrt_llm/quantization/layers.py``) take e4m3 ``weight [out, in]`` with one float32
``per_channel_scale`` per output row, which holds a per-channel source exactly and a per-tensor
one as its scale repeated on every row: the weights are the source's bytes, never re-quantized.
TensorRT-LLM's ``FP8`` (per tensor) would need one scale for the fused q/k/v (three source
scales) and a static activation scale, i.e. re-quantization or calibration. Activations are
quantized per token at run time (a static ``input_scale`` of the source is not used).
``exclude_modules`` keeps the final norm, the embedding and the head in the model dtype
(``fp8_rowwise_quantize`` adds them anyway); every decoder layer's attention and MLP run fp8."""
from __future__ import annotations

import numpy as np

from common.dtypes import BY_NAME
from common.errors import UserError
from convert.casts import to_float32

from .weights import ComputedTensor, check_linear

#: what TensorRT-LLM's fp8_rowwise_quantize always leaves in the model dtype
EXCLUDES = ("*ln_f", "*ln_embed", "*lm_head")
CLAMP_VAL = (-1200.0, 1200.0)


def stage(spec, source, t) -> list | None:
    """The entries replacing planned tensor ``t`` (an fp8 linear's weight), or None."""
    if not check_linear(source, t):
        return None
    prefix = t.name[:-len("weight")]
    cache: dict = {}

    def load(k):
        if not cache:
            cache.update(linear_tensors(source, t))
        return cache.pop(k)

    return [ComputedTensor(prefix + "weight", t.shape, BY_NAME["float8_e4m3fn"],
                           lambda: load("weight")),
            ComputedTensor(prefix + "per_channel_scale", (t.shape[0],), BY_NAME["float32"],
                           lambda: load("per_channel_scale"))]


def linear_tensors(source, t) -> dict[str, np.ndarray]:
    """The rank's e4m3 ``weight`` bytes and float32 ``per_channel_scale`` of planned ``t``."""
    weights, scales = [], []
    for p in t.pieces:
        if p.pad_cols:
            raise UserError("head padding of a pre-quantized input does not convert; choose a "
                            "--tp without --pad-heads")
        if p.source is None:  # zero rows (padded heads): e4m3 zero, scale 1
            weights.append(np.zeros(p.shape, np.uint8))
            scales.append(np.ones(p.shape[0], np.float32))
            continue
        weights.append(source.read_bits(p.source, p.index))
        name = p.source[:-len("weight")] + "weight_scale"
        s = to_float32(source.read_bits(name), source.dtype(name)).reshape(-1)
        rows = p.index[0] if p.index else slice(None)
        out = source.shape(p.source)[0]
        scales.append(np.broadcast_to(s, (out,))[rows] if s.size in (1, out) else _bad(name, s))
    return {"weight": np.concatenate(weights) if len(weights) > 1 else weights[0],
            "per_channel_scale": np.ascontiguousarray(np.concatenate(scales), np.float32)}


def _bad(name, s):
    raise UserError(f"{name} has {s.size} scales: a per-tensor or per-channel fp8 weight has 1 "
                    f"or one per output row")


def quantization_block(spec) -> dict:
    return {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None,
            "group_size": 128, "smoothquant_val": 0.5, "clamp_val": list(CLAMP_VAL),
            "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False,
            "exclude_modules": list(EXCLUDES)}
