"""The reference reader's FP8 rowwise kernel (``FP8_PER_CHANNEL_PER_TOKEN``), registered into
verify/kernel_table.py on import (verify/kernels.py imports this module).

TensorRT-LLM's ``Fp8RowwiseLinear`` / ``Fp8RowwiseRowLinear`` (``tensorrt_llm/quantization/
layers.py``) multiply an fp8 input, quantized per token (``quantize_fp8_per_token``, or fused
into ``Fp8RowwiseRmsNorm`` for the norm that feeds the linear: the same numbers), with the fp8
weight, and scale the product by the token's scale and the weight's ``per_channel_scale``
(``fp8_rowwise_gemm``). Simulated here in float32: the input clamped to the checkpoint's
``clamp_val``, per token ``scale = max(amax / 448, 1 / (448 * 512))`` over this rank's input (a
row-parallel linear's input is the rank's own slice), rounded to e4m3 and dequantized, times the
dequantized weight.

A module the recipe leaves in the model dtype (attention with the MLP-only recipe, the first and
last layers with Meta's) holds a float weight and no ``per_channel_scale``: TensorRT-LLM builds it
as a plain linear, and so does this kernel (which modules those are is the converter's to decide
and tests/test_fp8_rowwise.py's to check against TensorRT-LLM's rule)."""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import UserError

from .kernel_table import QuantSpec, register_linear, require

Tensor = torch.Tensor
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)


def fake_quant_per_token(x: Tensor, clamp) -> Tensor:
    """fp8 e4m3 quantize + dequantize with one scale per token (the last dim)."""
    x = x.float()
    if clamp is not None:
        x = x.clamp(float(clamp[0]), float(clamp[1]))
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


@register_linear("FP8_PER_CHANNEL_PER_TOKEN")
def _linear_fp8_rowwise(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    w = require(params, "weight")
    if w.dtype != torch.float8_e4m3fn:
        if "per_channel_scale" in params:
            raise UserError(f"FP8_PER_CHANNEL_PER_TOKEN needs a float8_e4m3fn weight beside "
                            f"per_channel_scale, the checkpoint holds {w.dtype}")
        return (x.float() @ w.float().t()).to(x.dtype)  # a module the recipe leaves unquantized
    scale = require(params, "per_channel_scale").float().reshape(-1)
    if scale.shape[0] != w.shape[0]:
        raise UserError(f"per_channel_scale has {scale.shape[0]} values for {w.shape[0]} output channels")
    xq = fake_quant_per_token(x, qcfg.raw.get("clamp_val"))
    return (xq @ (w.float() * scale[:, None]).t()).to(x.dtype)
