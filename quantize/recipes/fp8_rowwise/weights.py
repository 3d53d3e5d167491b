"""FP8 rowwise weight arithmetic: TensorRT-LLM's ``fp8_per_channel_quant_weight_gpu``
(``tensorrt_llm/models/llama/convert.py``), applied to one rank's weight after the tensor-parallel
split (its converter splits, then quantizes: a row-parallel ``mlp.proj`` gets each rank's own
per-row scales)."""
from __future__ import annotations

import torch

FP8_MAX = 448.0
#: the smallest scale: 1 / (448 * 512), as TensorRT-LLM floors it
MIN_SCALE = 1.0 / (448.0 * 512.0)


def quantize_rowwise(weight: torch.Tensor, clamp: tuple[float, float]):
    """``weight`` [out, in] (the checkpoint dtype) -> (float8_e4m3fn [out, in], float32 [out]):
    clamped to ``clamp``, scale = max(amax of the row / 448, 1 / (448 * 512)), weight / scale
    saturated to +-448 and rounded to e4m3."""
    x = weight.float().clamp(clamp[0], clamp[1])
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(-1)
