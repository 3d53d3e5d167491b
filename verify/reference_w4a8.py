"""The reference reader's W4A8_AWQ kernel (INT4 AWQ weights, FP8 activations), registered into
verify/kernel_table.py on import (verify/kernels.py imports this module).

What TensorRT-LLM 1.x makes of the checkpoint's tensors before the engine runs
(``models/modeling_utils.py`` ``preprocess_weights``, W4A8_AWQ), reproduced here in the same
dtypes (its divisions are in place, so they keep the left operand's dtype):

* group scales: ``weights_scaling_factor`` [out, in/g] cast to the model dtype, divided by
  ``weights_scaling_factor_2`` in that dtype, then cast to float16 (the W4A8 kernel's scale type;
  viewed, not converted, as the model dtype);
* ``prequant_scaling_factor`` (model dtype) divided in place by ``activation_scaling_factor``;
* ``alpha = activation_scaling_factor * weights_scaling_factor_2`` (float32).

``WeightOnlyGroupwiseQuantLinear(use_w4a8_awq=True)`` (``quantization/layers.py``) then runs
``weight_only_groupwise_quant_matmul``: the input times the divided pre-quant scale, in the model
dtype, converted to e4m3 (saturated to +-448 here), times the int4 weight dequantized with the
float16 group scales and converted to e4m3 too (the FP8 GEMM's operand: dividing the group scales
by ``weights_scaling_factor_2`` = the weight's amax / 448 is what puts them in e4m3's range, and
modelopt's fake quantization rounds the same way: its FP8 stage after the INT4 one), times
``alpha``. The GEMM is summed in float64 (products and sums of e4m3 values are exact there) so
that a tp split does not change the result's bits.
"""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import UserError

from .kernel_table import QuantSpec, register_linear, require
from .reference_quant import FP8_MAX, model_dtype, unpack_int4_rows

Tensor = torch.Tensor


def _scalar(params: Mapping[str, Tensor], name: str) -> Tensor:
    t = require(params, name).float().reshape(-1)
    if t.numel() != 1:
        raise UserError(f"{name} has {t.numel()} values, W4A8_AWQ takes one per linear")
    return t


def w4a8_group_scales(wsf: Tensor, wsf2: Tensor, dtype: torch.dtype) -> Tensor:
    """preprocess_weights' group scales [out, in/g] as float32 values of the float16 kernel scale."""
    s = wsf.to(dtype)
    return (s.float() / wsf2).to(dtype).to(torch.float16).float()


@register_linear("W4A8_AWQ")
def _linear_w4a8_awq(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    q = unpack_int4_rows(require(params, "weight"))
    out, inp = q.shape
    g = int(qcfg.group_size or 128)
    if inp % g:
        raise UserError(f"input size {inp} is not a multiple of group_size {g}")
    wsf = require(params, "weights_scaling_factor")
    if tuple(wsf.shape) != (out, inp // g):
        raise UserError(f"weights_scaling_factor has shape {list(wsf.shape)}, expected {[out, inp // g]}")
    wsf2, act = _scalar(params, "weights_scaling_factor_2"), _scalar(params, "activation_scaling_factor")
    dtype = model_dtype(qcfg)
    pqs = require(params, "prequant_scaling_factor").reshape(-1)
    if pqs.numel() != inp:
        raise UserError(f"prequant_scaling_factor has {pqs.numel()} values for {inp} inputs")
    pqs = (pqs.to(dtype).float() / act).to(dtype)
    xs = (x.to(dtype) * pqs).float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    w = q.float() * w4a8_group_scales(wsf, wsf2, dtype).repeat_interleave(g, dim=1)
    w = w.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double()  # the GEMM's e4m3 operand
    return ((xs.double() @ w.t()).float() * (act * wsf2)).to(x.dtype)
