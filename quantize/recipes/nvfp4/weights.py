"""NVFP4's arithmetic (torch; imported inside the recipe's methods and by the reader).

The format (modelopt 0.47, ``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``
``NVFP4QTensor``; TensorRT-LLM 1.2 ``FP4Linear``):

* a weight ``w [out, in]`` is cut into blocks of 16 consecutive inputs of a row;
* the global scale ``weights_scaling_factor_2 = amax(|w|) / (6 * 448)`` (6: E2M1's largest value,
  448: E4M3's), float32, one per linear (the max over a fused q/k/v or gate/up group);
* each block's scale ``weights_scaling_factor = fp8_e4m3(clamp(amax(|block|) / (6 * global),
  2^-9, 448))`` (an all-zero block: 1.0), so ``scale * global`` maps the block onto [-6, 6];
* each element ``e2m1(w / (scale * global))``, rounded to the nearest of 0, 0.5, 1, 1.5, 2, 3,
  4, 6 with ties to the even code (``_cast_fp4``: the bounds 0.75, 1.75 and 3.5 round up, 0.25,
  1.25, 2.5 and 5 down), sign in bit 3; two codes per byte, the even input in the low nibble:
  ``uint8 [out, in / 2]``;
* activations: ``activation_scaling_factor = amax(|x|) / (6 * 448)`` (calibrated global), the
  E2M1 blocks and their E4M3 scales are computed per token at run time.

TensorRT-LLM's ``preprocess_weights`` (``tensorrt_llm/models/modeling_utils.py``, NVFP4 branch)
renames the scales and derives two tensors: ``weights_block_scaling_factor`` (the block scales
unchanged), ``weights_block_scaling_factor_interleaved`` (:func:`interleave_block_scales`),
``weights_global_scaling_factor`` / ``activation_global_scaling_factor`` (the two globals) and
``alpha = activation global * weight global`` (the GEMM's output scale).
"""
from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
#: E2M1 code (bit 3: sign) -> value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_ODD_BOUNDS = (0.75, 1.75, 3.5)  # ties that round up to the even code


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / (6 * 448)`` in float32 (a weight's or an activation's global scale)."""
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def block_scales(w: torch.Tensor, global_sf: torch.Tensor) -> torch.Tensor:
    """The E4M3 block scales ``[..., in / 16]`` of ``w [..., in]`` under ``global_sf``."""
    amax = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK).abs().amax(dim=-1).float()
    scale = amax / (E2M1_MAX * global_sf)
    scale[scale == 0] = 1.0
    return scale.clamp(min=2 ** -9, max=E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """The E2M1 code (uint8, 0..15) of every element of ``x`` (already divided by its scale)."""
    bounds = torch.tensor(_BOUNDS, dtype=x.dtype)
    mag = x.abs()
    code = torch.searchsorted(bounds, mag, out_int32=True).to(torch.uint8)
    tie = torch.zeros_like(code)
    for b in _ODD_BOUNDS:
        tie |= (mag == b).to(torch.uint8)
    return ((x < 0).to(torch.uint8) << 3) + code + tie


def quantize(w: torch.Tensor, scales: torch.Tensor, global_sf: torch.Tensor) -> torch.Tensor:
    """``w [out, in]`` -> packed E2M1 ``uint8 [out, in / 2]`` (low nibble: the even input)."""
    out, inp = w.shape
    per_block = (scales.float() * global_sf).unsqueeze(-1)
    scaled = (w.reshape(out, inp // BLOCK, BLOCK) / per_block).reshape(out, inp)
    codes = e2m1_codes(scaled)
    return (codes[:, 1::2] << 4) | codes[:, 0::2]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packed ``uint8 [..., n / 2]`` -> the E2M1 values ``float32 [..., n]``."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return values[codes.long()]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, global_sf: torch.Tensor) -> torch.Tensor:
    """What TensorRT-LLM's ``block_double_dequantize`` gives: ``e2m1 * float(scale) * global``,
    float32 ``[..., in]``."""
    vals = unpack(packed)
    per_block = scales.float() * global_sf.float()
    return (vals.reshape(*scales.shape, BLOCK) * per_block.unsqueeze(-1)).reshape(vals.shape)


def fake_quantize_blocks(x: torch.Tensor, global_sf: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization of activations ``x [..., in]`` with a calibrated global scale: per
    16-element block an E4M3 scale ``amax / (6 * global)``, E2M1 rounding, dequantized (float32).
    TensorRT-LLM's ``FP4Linear`` quantizes its input this way at run time (``dynamic_quantize`` /
    ``quantize_to_fp4_tensor`` with ``activation_global_scaling_factor``)."""
    shape = x.shape
    xf = x.float().reshape(-1, shape[-1])
    scales = block_scales(xf, global_sf)
    per_block = (scales.float() * global_sf).unsqueeze(-1)
    scaled = (xf.reshape(xf.shape[0], -1, BLOCK) / per_block).reshape(xf.shape)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[e2m1_codes(scaled).long()]
    return (values.reshape(xf.shape[0], -1, BLOCK) * per_block).reshape(shape)


def interleave_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """``weights_block_scaling_factor_interleaved``: TensorRT-LLM's ``block_scale_interleave``
    (``cpp/tensorrt_llm/kernels/quantization.cu``, ``get_sf_out_offset_128x4``), in plain
    arithmetic. The scales ``[rows, cols]`` are zero-padded to ``[pad128(rows), pad4(cols)]`` and
    element ``(m, k)`` goes to ``((m // 128) * tiles_k + k // 4) * 512 + (m % 32) * 16 +
    ((m % 128) // 32) * 4 + k % 4`` with ``tiles_k = pad4(cols) / 4``; the result is
    ``[pad128(rows), pad4(cols)]`` (float8_e4m3fn) as preprocess_weights reshapes it."""
    rows, cols = scales.shape
    nrows, ncols = -(-rows // 128) * 128, -(-cols // 4) * 4
    src = torch.zeros((nrows, ncols), dtype=torch.uint8)
    src[:rows, :cols] = scales.view(torch.uint8)
    m = torch.arange(nrows).unsqueeze(1)
    k = torch.arange(ncols).unsqueeze(0)
    dst = ((m // 128) * (ncols // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
    out = torch.empty(nrows * ncols, dtype=torch.uint8)
    out[dst.reshape(-1)] = src.reshape(-1)
    return out.reshape(nrows, ncols).view(torch.float8_e4m3fn)


def export_linear(weight: torch.Tensor, weight_amax: torch.Tensor,
                  input_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One linear's tensors as modelopt 0.47's TensorRT-LLM export writes them (0-dim globals)."""
    wsf2 = global_scale(weight_amax.reshape(()))
    scales = block_scales(weight, wsf2)
    out = {"weight": quantize(weight, scales, wsf2), "weights_scaling_factor": scales,
           "weights_scaling_factor_2": wsf2}
    if input_amax is not None:
        out["activation_scaling_factor"] = global_scale(input_amax.reshape(()))
    return out
