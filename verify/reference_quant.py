"""Quantized kernels of the CPU reference reader: what a TensorRT-LLM (1.2-era) engine computes for
each ``quant_algo`` / ``kv_cache_quant_algo`` of a checkpoint, simulated in float32 on CPU.

Registered into ``verify.kernels``' dispatch tables on import (``verify.kernels`` imports this
module at its end). Each linear kernel gets one rank's module tensors by suffix and returns
``x @ W^T`` without bias. The engine-side sources each kernel follows:

* ``W8A8_SQ_PER_CHANNEL`` (modelopt's SmoothQuant checkpoint; TensorRT-LLM's non-plugin
  ``Int8SmoothQuantLinear`` / ``Int8SmoothQuantRowLinear`` in ``tensorrt_llm/quantization/layers.py``):
  ``x * prequant_scaling_factor`` -> cast to float32 -> TensorRT ``quantize(x, activation_scaling_factor,
  'int8')`` (IQuantizeLayer: ``round(x / scale)``, ties to even, saturated to [-128, 127]) ->
  ``dequantize`` -> int8 weight ``dequantize`` along axis 0 with ``weights_scaling_factor`` -> GEMM.
* ``FP8`` (``FP8Linear`` / ``FP8RowLinear``): the per-tensor activation scale is cast to the model dtype,
  ``quantize(x, scale, 'fp8')`` (e4m3, saturated to +-448), GEMM of the fp8 operands with
  ``alpha = weights_scaling_factor * activation_scaling_factor``.
* ``W4A16_AWQ`` (``WeightOnlyGroupwiseQuantLinear``, ``weight_only_groupwise_quant_matmul``):
  ``x * prequant_scaling_factor`` times the int4 weight, two values a byte along the output dim
  (low nibble = even row; modelopt's ``pack_int4_in_uint8``), dequantized per group of ``group_size``
  inputs with ``weights_scaling_factor`` [out, in/group] (cast to the model dtype by TensorRT-LLM's
  ``postprocess_weight_only_groupwise``); with ``has_zero_point`` a ``zero`` [in/group, out] (model
  dtype) is added after scaling (``w = q * scale + zero``: TensorRT-LLM's GPTQ zeros, a pre-quantized
  asymmetric input's); activations stay in the model dtype (A16).
* ``W8A16`` / ``W4A16`` (weight only): the checkpoint holds FLOAT weights; ``trtllm-build`` quantizes
  them (``models/modeling_utils.py`` ``preprocess_weights`` -> ``weight_only_quantize_dict`` ->
  ``torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix(weight.t())``), whose C++ is
  ``symmetric_quantize`` in ``cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp``:
  per output channel ``scale = max|W[o, :]| * quant_range_scale`` with
  ``quant_range_scale = 1 / (1 << (bits - 1))`` (i.e. absmax/128 for int8, absmax/8 for int4 -- not
  /127 and /7), ``q = round(W / scale)`` with C ``round`` (ties AWAY from zero) and the float32 scale,
  clamped to [-128, 127] / [-8, 7]; the scale is stored in the model dtype (``ComputeType``) and the
  GEMM uses ``q * scale``. modelopt's own pre-quantized W8A16 export (int8 ``weight`` +
  ``weights_scaling_factor`` [out]) is read as ``q * scale`` too.
* KV cache ``INT8`` / ``FP8`` (``gpt_attention`` plugin): K (after RoPE) and V are written to the cache
  as ``convert(x * (1 / kv_cache_scaling_factor))`` and read back times ``kv_cache_scaling_factor``;
  int8 conversion is ``__float2int_rn`` saturated to [-128, 127] (ties to even), fp8 is the
  saturating e4m3 conversion.

Our float32 compute differs from the engine's fp16/bf16 activations by the usual rounding; what is
simulated exactly is every quantization step (the part that makes a format lose quality).
"""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import UserError
from .kernel_table import QuantSpec, register_kv_cache, register_linear, require

Tensor = torch.Tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def model_dtype(qcfg: QuantSpec) -> torch.dtype:
    """The checkpoint's ``dtype`` (what TensorRT-LLM casts scales to), float32 when unknown."""
    return _TORCH_DTYPES.get(qcfg.dtype or "float32", torch.float32)


def round_half_away(x: Tensor) -> Tensor:
    """C ``round()``: ties away from zero (torch.round rounds ties to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def fake_quant_int8(x: Tensor, scale: Tensor) -> Tensor:
    """TensorRT int8 quantize + dequantize, per-tensor ``scale``: ties to even, saturated to [-128, 127]."""
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def exact_matmul(q: Tensor, w: Tensor) -> Tensor:
    """``q @ w^T`` of quantized values (int8 or e4m3 codes) in float64, where their products and
    sums are exact, returned as float32: the same bits whatever the summation order (tp, CPU)."""
    return (q.double() @ w.double().t()).float()


def fake_quant_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Saturating e4m3 quantize + dequantize with a per-tensor ``scale`` (float32 math)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def _check_shape(t: Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{what} has shape {list(t.shape)}, expected {list(shape)}")


def _int8_weight(params: Mapping[str, Tensor], algo: str) -> Tensor:
    w = require(params, "weight")
    if w.dtype != torch.int8:
        raise UserError(f"{algo} needs an int8 weight, the checkpoint holds {w.dtype}")
    return w


# ---------------------------------------------------------------------------------------------
# Linear kernels
# ---------------------------------------------------------------------------------------------


@register_linear("W8A8_SQ_PER_CHANNEL")
def _linear_smoothquant(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    w = _int8_weight(params, "W8A8_SQ_PER_CHANNEL")
    out, inp = w.shape
    wsf = require(params, "weights_scaling_factor").float().reshape(-1)
    _check_shape(wsf, (out,), "weights_scaling_factor")
    act = require(params, "activation_scaling_factor").float().reshape(-1)
    _check_shape(act, (1,), "activation_scaling_factor")
    pqs = require(params, "prequant_scaling_factor").float().reshape(-1)
    _check_shape(pqs, (inp,), "prequant_scaling_factor")
    # TensorRT-LLM's int8 GEMM accumulates in int32 (exact): integers summed in float64 (exact
    # below 2^53), so the result does not depend on the summation order, a tp split included
    q = torch.clamp(torch.round(x.float() * pqs / act), -128, 127)
    acc = exact_matmul(q, w)
    return (acc * act * wsf).to(x.dtype)


@register_linear("FP8")
def _linear_fp8(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    w = require(params, "weight")
    if w.dtype != torch.float8_e4m3fn:
        raise UserError(f"FP8 needs a float8_e4m3fn weight, the checkpoint holds {w.dtype}")
    wsf = require(params, "weights_scaling_factor").float().reshape(-1)
    _check_shape(wsf, (1,), "weights_scaling_factor")
    act = require(params, "activation_scaling_factor").float().reshape(-1)
    _check_shape(act, (1,), "activation_scaling_factor")
    act = act.to(model_dtype(qcfg)).float()  # FP8Linear casts the activation scale to the model dtype
    q = (x.float() / act).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    # products of two e4m3 values are exact in float64 and so are their sums (a range of < 53
    # bits): the fp32-accumulating FP8 GEMM without an order of its own
    return (exact_matmul(q, w) * act * wsf).to(x.dtype)


def unpack_int4_rows(packed: Tensor) -> Tensor:
    """int8 [out/2, in] (two int4 along the output dim, low nibble = even row) -> int8 [out, in]."""
    p = packed.view(torch.int8) if packed.dtype == torch.uint8 else packed
    if p.dtype != torch.int8:
        raise UserError(f"packed int4 weight must be int8, got {packed.dtype}")
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)  # sign-extended low nibble
    high = torch.bitwise_right_shift(p, 4)                                # arithmetic shift
    return torch.stack((low, high), dim=1).reshape(p.shape[0] * 2, p.shape[1])


@register_linear("W4A16_AWQ")
def _linear_awq(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    packed = require(params, "weight")
    q = unpack_int4_rows(packed)
    out, inp = q.shape
    g = int(qcfg.group_size or 128)
    if inp % g:
        raise UserError(f"input size {inp} is not a multiple of group_size {g}")
    wsf = require(params, "weights_scaling_factor")
    _check_shape(wsf, (out, inp // g), "weights_scaling_factor")
    scale = wsf.to(model_dtype(qcfg)).float().repeat_interleave(g, dim=1)
    w = q.float() * scale
    if qcfg.has_zero_point or "zero" in params:  # added after scaling, [in/group, out]
        zero = require(params, "zero")
        _check_shape(zero, (inp // g, out), "zero")
        w = w + zero.to(model_dtype(qcfg)).float().T.repeat_interleave(g, dim=1)
    xs = x.float()
    if qcfg.pre_quant_scale or "prequant_scaling_factor" in params:
        pqs = require(params, "prequant_scaling_factor").float().reshape(-1)
        _check_shape(pqs, (inp,), "prequant_scaling_factor")
        xs = xs * pqs
    return (xs @ w.t()).to(x.dtype)


# Weight-only: (bits, quant_range_scale, clamp range) of TensorRT-LLM's symmetric_quantize.
WEIGHT_ONLY = {"W8A16": (8, 1.0 / 128, (-128, 127)), "W4A16": (4, 1.0 / 8, (-8, 7))}


def weight_only_quantize(w: Tensor, algo: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """What trtllm-build does to a float [out, in] weight for ``algo``: (int q [out, in], scale [out] in ``dtype``)."""
    _, range_scale, (lo, hi) = WEIGHT_ONLY[algo]
    wf = w.to(dtype).float()                       # the weight as the engine build reads it
    scale = wf.abs().amax(dim=1) * range_scale      # float32, used for rounding
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.where(scale[:, None] == 0, torch.zeros_like(wf), round_half_away(wf / safe[:, None]))
    return q.clamp(lo, hi).to(torch.int8), scale.to(dtype)


def weight_only_dequantize(w: Tensor, algo: str, dtype: torch.dtype) -> Tensor:
    q, scale = weight_only_quantize(w, algo, dtype)
    return q.float() * scale.float()[:, None]


def _linear_weight_only(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec, algo: str,
                        int8_export: bool = False) -> Tensor:
    """``int8_export``: also read modelopt's own W8A16 export (int8 weights, per-channel scales)."""
    w = require(params, "weight")
    if w.is_floating_point():
        wd = weight_only_dequantize(w, algo, model_dtype(qcfg))
    elif w.dtype == torch.int8 and int8_export and "weights_scaling_factor" in params:
        wsf = params["weights_scaling_factor"].float().reshape(-1)   # modelopt's own W8A16 export
        _check_shape(wsf, (w.shape[0],), "weights_scaling_factor")
        wd = w.float() * wsf[:, None]
    else:
        raise UserError(f"{algo} checkpoints hold float [out, in] weights (the engine build quantizes them); "
                        f"got {w.dtype}{' without weights_scaling_factor' if w.dtype == torch.int8 else ''}")
    return (x.float() @ wd.t()).to(x.dtype)


@register_linear("W8A16")
def _linear_w8a16(x, params, qcfg):
    return _linear_weight_only(x, params, qcfg, "W8A16", int8_export=True)


@register_linear("W4A16")
def _linear_w4a16(x, params, qcfg):
    return _linear_weight_only(x, params, qcfg, "W4A16")


# ---------------------------------------------------------------------------------------------
# KV cache kernels
# ---------------------------------------------------------------------------------------------


def _kv_scale(params: Mapping[str, Tensor]) -> Tensor:
    s = require(params, "kv_cache_scaling_factor", "attention").float().reshape(-1)
    _check_shape(s, (1,), "attention.kv_cache_scaling_factor")
    if not (float(s) > 0):
        raise UserError(f"attention.kv_cache_scaling_factor must be > 0, got {float(s)}")
    return s


@register_kv_cache("INT8")
def _kv_int8(k: Tensor, v: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec):
    s = _kv_scale(params)
    rcp = 1.0 / s
    deq = lambda t: (torch.clamp(torch.round(t.float() * rcp), -128, 127) * s).to(t.dtype)  # noqa: E731
    return deq(k), deq(v)


@register_kv_cache("FP8")
def _kv_fp8(k: Tensor, v: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec):
    s = _kv_scale(params)
    rcp = 1.0 / s
    deq = lambda t: ((t.float() * rcp).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(t.dtype)  # noqa: E731
    return deq(k), deq(v)
