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


class LongRope:
    """TensorRT-LLM's ``long_rope`` (Phi-3): two tables, short and long factors, each the inverse
    frequencies divided by its factors and cos/sin times one mscale,
    sqrt(1 + ln(max_position_embeddings / original) / ln(original)) (``functional.py``
    ``RopeEmbeddingUtils.create_sinusoidal_positions_long_rope_for_attention_plugin``, Phi-3
    passing no mscale of its own); the attention plugin rotates a batch with the long table when
    its longest context exceeds ``original_max_position_embeddings`` (``gptAttentionCommon.cpp``:
    ``max_context_q_len > mRotaryEmbeddingOriginalMaxPositions``)."""

    def __init__(self, c: dict, rot_dim: int, base: float, where):
        try:
            self.original = int(c["original_max_position_embeddings"])
            short = torch.tensor(c["longrope_scaling_short_factors"], dtype=torch.float32)
            long = torch.tensor(c["longrope_scaling_long_factors"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: long_rope needs original_max_position_embeddings and "
                            f"longrope_scaling_short/long_factors ({e})") from None
        if short.shape != (rot_dim // 2,) or long.shape != (rot_dim // 2,):
            raise UserError(f"{where}: longrope factors must have {rot_dim // 2} entries each")
        freq = base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float) / rot_dim)
        self.short, self.long = 1.0 / (short * freq), 1.0 / (long * freq)
        scale = int(c["max_position_embeddings"]) / self.original
        self.mscale = math.sqrt(1 + math.log(scale) / math.log(self.original)) if scale > 1 else 1.0

    def for_length(self, seq: int) -> tuple[Tensor, float]:
        """(inverse frequencies, cos/sin scale) of a batch whose longest context is ``seq``."""
        return (self.long if seq > self.original else self.short), self.mscale


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
