"""TensorRT-LLM's SmoothQuant plugin formats in the CPU reference reader (``W8A8_SQ_*_PLUGIN``, what
TensorRT-LLM's own ``convert_checkpoint.py --smoothquant`` writes), simulated in float32.

Registered into ``verify.kernels``' kernel table on import. The engine side, read from
``tensorrt_llm/quantization/layers.py`` (``SmoothQuantRmsNorm``, ``SmoothQuantLinear`` /
``SmoothQuantRowLinear``, ``SmoothQuantAttention``, ``SmoothQuantGatedMLP``) and ``functional.py``
(``smooth_quant_gemm``, ``quantize_per_token``, ``quantize_tensor``):

* The int8 input of qkv / fc / gate comes out of the (smoothed) RMSNorm: static formats
  ``round(y * scale_to_int)`` saturated to int8 (``scale_to_int`` of ``input_layernorm`` /
  ``post_layernorm``, passed here as ``input_scale``); per-token formats scale each token by
  127 / its max |y| and keep max / 127 as the token's dequantization scale.
* dense / proj: the float input (attention context, ``silu(fc) * gate``) is divided by
  ``smoother``, then quantized with ``attention`` / ``mlp.quantization_scaling_factor`` (static)
  or per token over this rank's own slice (the row-parallel input).
* GEMM: int8 x int8 -> int32, times the activation scale (``act_scale`` static, the token's scale
  per token) and ``per_channel_scale`` ([1, out] or [1, 1]); bias after (the caller adds it).
"""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import UserError

from .kernel_table import QuantSpec, register_linear, require

Tensor = torch.Tensor

SQ_PLUGIN_ALGOS = ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
                   "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN")


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8-valued float q, scale [..., 1]) with x ~ q * scale: 127 / max |x| per token, ties to even."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
    return torch.round(x * (127.0 / amax)).clamp(-128, 127), amax / 127.0


def quantize_static(x: Tensor, scale_to_int: Tensor) -> Tensor:
    return torch.round(x * scale_to_int).clamp(-128, 127)


@register_linear(*SQ_PLUGIN_ALGOS)
def _linear_sq_plugin(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    algo = qcfg.quant_algo
    w = require(params, "weight")
    if w.dtype != torch.int8:
        raise UserError(f"{algo} needs an int8 weight, the checkpoint holds {w.dtype}")
    out, inp = w.shape
    pcs = require(params, "per_channel_scale").float()
    if tuple(pcs.shape) not in ((1, out), (1, 1)):
        raise UserError(f"per_channel_scale has shape {list(pcs.shape)}, expected [1, {out}] or [1, 1]")
    xs = x.float()
    if "smoother" in params:
        sm = params["smoother"].float()
        if tuple(sm.shape) != (1, inp):
            raise UserError(f"smoother has shape {list(sm.shape)}, expected [1, {inp}]")
        xs = xs / sm
    if "PER_TOKEN" in algo:
        q, a = quantize_per_token(xs)
    else:
        s = require(params, "input_scale", "scale_to_int / quantization_scaling_factor").float().reshape(-1)
        if s.numel() != 1:
            raise UserError(f"static input scale has {s.numel()} values, expected 1")
        q = quantize_static(xs, s)
        a = require(params, "act_scale").float().reshape(1)
    acc = q @ w.float().t()  # int32 accumulation, exact in float32 below 2^24
    return (acc * a * pcs.reshape(-1)).to(x.dtype)
