"""The reference reader's NVFP4 kernel, registered into verify/kernel_table.py on import
(verify/kernels.py imports this module). Written from TensorRT-LLM 1.2's sources, apart from the
converter's arithmetic (quantize/recipes/nvfp4/weights.py), so that each checks the other.

What the engine does with a checkpoint linear (``weight`` uint8 [out, in/2], two E2M1 codes per
byte, the even input in the low nibble; ``weights_scaling_factor`` E4M3 [out, in/16];
``weights_scaling_factor_2`` and ``activation_scaling_factor`` float32 globals):

* ``preprocess_weights`` (``tensorrt_llm/models/modeling_utils.py``, NVFP4) renames the globals
  (``weights_global_scaling_factor``, ``activation_global_scaling_factor``), keeps the block
  scales (``weights_block_scaling_factor``), adds ``alpha = activation global * weight global``
  and ``weights_block_scaling_factor_interleaved``: ``block_scale_interleave``, the 128 x 4
  swizzled layout the NVFP4 GEMM plugin reads (:func:`interleaved_offset`);
* ``FP4Linear.forward`` with ``gemm_plugin nvfp4``: the input is quantized per 16-element block
  of a token (``quantize_to_fp4_tensor`` with ``1 / activation global``: the block scale
  ``e4m3(amax / 6 / global)``, then each element ``e2m1(x / (scale * global))``), and
  ``fp4_gemm`` multiplies the E2M1 codes times their block scales (the weight's read from the
  interleaved tensor) and scales the sum by ``alpha``.

Simulated here in float64 (E2M1 x E4M3 products and their sums are exact there, so the result
does not depend on the summation order or the tp split), times alpha, cast to the model dtype.

An NVFP4 KV cache (``--target pytorch`` only; TensorRT-LLM 1.2's PyTorch backend, ``XQA`` /
FMHA kernels with an E2M1 cache and a pool of E4M3 block scales beside it): every token's key
and value of a head, in blocks of 16 along head_dim, stored as E2M1 codes with an E4M3 block
scale ``amax(block) / 6 / global`` and read back as code * scale * global (:func:`_kv_nvfp4`).
The global scale is the calibrated one of modelopt's ``NVFP4_KV_CFG`` quantizers, ``amax / (6 *
448)`` = the checkpoint's ``k_scale`` (``amax / 448``) / 6: the reader equals modelopt's fake
quantization of the cache. TensorRT-LLM loads ``k_scale`` / ``v_scale`` into its own global
scales (``kv_scales``; identity when ``TRTLLM_LOAD_KV_SCALES`` is off): a different global moves
only where the E4M3 block scales round, not the E2M1 grid.
"""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import UserError

from .kernel_table import QuantSpec, register_kv_cache, register_linear, require

Tensor = torch.Tensor

SF_VEC = 16
#: E2M1 code -> value (bit 3: the sign), as the hardware's e2m1 conversion defines it
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
_GRID = E2M1[:8]


def interleaved_offset(m: Tensor, k: Tensor, cols: int) -> Tensor:
    """``get_sf_out_offset_128x4`` (cpp/tensorrt_llm/kernels/quantization.cuh) of block scale
    ``(m, k)`` of a matrix with ``cols`` scale columns: layout [m tiles of 128, k tiles of 4,
    32, 4, 4] (row m % 32 outer, (m % 128) // 32 inner, k % 4 innermost)."""
    k_tiles = (cols + 3) // 4
    return ((m // 128) * k_tiles + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4


def interleave(scales: Tensor) -> Tensor:
    """``block_scale_interleave`` as preprocess_weights applies it: [pad128(rows), pad4(cols)]."""
    rows, cols = scales.shape
    nrows, ncols = (rows + 127) // 128 * 128, (cols + 3) // 4 * 4
    flat = torch.zeros(nrows * ncols, dtype=torch.uint8)
    m, k = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    flat[interleaved_offset(m, k, ncols).reshape(-1)] = scales.view(torch.uint8).reshape(-1)
    return flat.reshape(nrows, ncols).view(torch.float8_e4m3fn)


def scales_from_interleaved(inter: Tensor, rows: int, cols: int) -> Tensor:
    """The block scale each weight block's GEMM reads from the interleaved tensor, [rows, cols]."""
    m, k = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    flat = inter.view(torch.uint8).reshape(-1)
    return flat[interleaved_offset(m, k, inter.shape[1])].view(torch.float8_e4m3fn)


def e2m1_round(v: Tensor) -> Tensor:
    """Round to the nearest E2M1 value, ties to the even code (``cvt.rn.satfinite``), saturated
    at +-6."""
    mag = v.abs().double().clamp(max=6.0)
    hi = torch.searchsorted(_GRID, mag).clamp(max=7)
    lo = (hi - 1).clamp(min=0)
    d_hi, d_lo = _GRID[hi] - mag, mag - _GRID[lo]
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return torch.sign(v).double() * _GRID[torch.where(take_hi, hi, lo)]


def quantize_activation(x: Tensor, global_sf: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_to_fp4_tensor``: (E2M1 values [..., in], E4M3 block scales as float64 [..., in/16])."""
    xb = x.double().reshape(*x.shape[:-1], -1, SF_VEC)
    g = global_sf.double()
    sf = (xb.abs().amax(dim=-1) / 6.0 / g).float().to(torch.float8_e4m3fn).double()
    step = torch.where(sf > 0, sf * g, torch.ones_like(sf))
    codes = torch.where(sf.unsqueeze(-1) > 0, e2m1_round(xb / step.unsqueeze(-1)),
                        torch.zeros_like(xb))
    return codes.reshape(x.shape), sf


def unpack(packed: Tensor) -> Tensor:
    """uint8 [out, in/2] -> E2M1 values float64 [out, in] (low nibble: the even input)."""
    if packed.dtype != torch.uint8:
        raise UserError(f"NVFP4 needs a uint8 weight (two E2M1 codes per byte), the checkpoint "
                        f"holds {packed.dtype}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return E2M1[codes.long()]


@register_linear("NVFP4")
def _linear_nvfp4(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    w = unpack(require(params, "weight"))
    out, inp = w.shape
    block = require(params, "weights_scaling_factor")
    if block.dtype != torch.float8_e4m3fn or tuple(block.shape) != (out, inp // SF_VEC):
        raise UserError(f"weights_scaling_factor must be float8_e4m3fn [{out}, {inp // SF_VEC}], "
                        f"got {block.dtype} {list(block.shape)}")
    w_global = require(params, "weights_scaling_factor_2").float().reshape(())
    a_global = require(params, "activation_scaling_factor").float().reshape(())
    alpha = (a_global * w_global).double()  # preprocess_weights: float32 product
    w_sf = scales_from_interleaved(interleave(block), out, inp // SF_VEC).double()
    wq = (w.reshape(out, -1, SF_VEC) * w_sf.unsqueeze(-1)).reshape(out, inp)
    xq, x_sf = quantize_activation(x, a_global)
    xs = (xq.reshape(*x_sf.shape, SF_VEC) * x_sf.unsqueeze(-1)).reshape(x.shape)
    return ((xs @ wq.t()) * alpha).to(x.dtype)


def _fake_nvfp4_cache(t: Tensor, k_scale: Tensor) -> Tensor:
    """``t`` [batch, heads, seq, head_dim] through an NVFP4 cache with global ``k_scale / 6``."""
    if t.shape[-1] % SF_VEC:
        raise UserError(f"an NVFP4 KV cache needs head_dim a multiple of {SF_VEC}, got {t.shape[-1]}")
    g = k_scale.double() / 6.0
    codes, sf = quantize_activation(t, g)
    return (codes.reshape(*sf.shape, SF_VEC) * (sf * g).unsqueeze(-1)).reshape(t.shape).to(t.dtype)


@register_kv_cache("NVFP4")
def _kv_nvfp4(k: Tensor, v: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec):
    scales = []
    for name in ("k_cache_scaling_factor", "v_cache_scaling_factor"):
        s = require(params, name, "attention").float().reshape(-1)
        if s.numel() != 1 or not float(s) > 0:
            raise UserError(f"attention.{name} must be one value > 0, got {s.tolist()}")
        scales.append(s.reshape(()))
    return _fake_nvfp4_cache(k, scales[0]), _fake_nvfp4_cache(v, scales[1])
