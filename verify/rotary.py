"""Rotary position embedding of the CPU reference reader: the inverse frequencies as transformers
computes them (default, ``linear``, ``llama3``; TensorRT-LLM reads the kind from ``rotary_scaling``'s
``type``, else HF's ``rope_type``) and GPT-NeoX rotary (``rotate_half``) on the first rotary dims."""
from __future__ import annotations

import math

import torch

from common.errors import UserError

Tensor = torch.Tensor


def rotary_inv_freq(rot_dim: int, base: float, scaling: dict | None) -> Tensor:
    """Inverse frequencies [rot_dim/2] as transformers computes them (default, linear, llama3)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float) / rot_dim))
    if not scaling:
        return inv_freq
    if not isinstance(scaling, dict):
        raise UserError(f"config.json: rotary_scaling must be an object, got {scaling!r}")
    # TensorRT-LLM reads the kind from "type", falling back to HF's "rope_type".
    kind = str(scaling.get("type", scaling.get("rope_type")) or "none").lower()
    if kind in ("none", "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling.get("factor", 1.0))
    if kind == "llama3":
        # Defaults are TensorRT-LLM's (and Meta's original): 8, 1, 4, 8192.
        factor = float(scaling.get("factor", 8.0))
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context_len = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise UserError(f"rotary_scaling type {kind!r} is not supported by the reference reader "
                    "(supported: linear, llama3; dynamic NTK and others are not implemented)")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX rotary on the first cos.shape[-1] dims of x [b, h, s, hd]."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)
