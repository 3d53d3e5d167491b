"""Calibration of a model whose hidden size is not a whole number of the format's input groups
(SmolLM2's 576 features and AWQ's group of 128): the layers are calibrated with the hidden size
padded to whole groups (``Shape.calib_hidden``), exactly as the engine checkpoint pads it
(quantize.apply.pad_features, model.spec.RESCALED_DIMS); and, when the attention output (q heads x
head size) is not whole groups either (SmolLM2's 9 heads of 64), with the heads padded as
``--pad-heads`` pads them for the checkpoint (``Shape.calib_heads``, quantize.head_padding).

The padded model computes the real model's function: zero embedding columns, zero input columns
of the linears reading the hidden features and zero output rows of those writing them keep the
padded features at exactly 0, and every RMSNorm over them gets its weight x sqrt(H / H') and its
epsilon x H / H' (mean over H' features of H real squares = H / H' x the real mean). The
calibration (modelopt's AWQ search and block quantizers) then sees whole groups: the last real
group is completed by zero features, as TensorRT-LLM's padded linear holds it. The calibrated
tensors come out with H' features; quantize.feature_padding pads them on to the checkpoint's
hidden size (the group boundaries are the same, so every tp that pads alike shares one
calibration); calibrated on padded heads, they need no head padding after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.families import FAMILIES
from model.shape import HeadPadding


@dataclass(frozen=True)
class CalibPad:
    """The calibration's model laid out as the checkpoint pads it: ``real`` -> ``padded`` hidden
    features, and ``heads`` (model.shape.HeadPadding: whole zero KV groups at the end, as
    quantize.head_padding pads) when the attention output is not whole groups either."""

    family: str
    real: int
    padded: int
    heads: HeadPadding | None = None

    @property
    def norm_scale(self) -> float:
        return math.sqrt(self.real / self.padded)

    def fingerprint(self) -> dict:
        h = self.heads
        return {"hidden": [self.real, self.padded],
                **({"heads": [h.heads, h.padded_heads, h.kv_heads, h.padded_kv_heads]} if h else {}),
                "padded_smoothing": 1}  # stores from before neutral_smoothing are not reused

    def config(self, config) -> None:
        """Pad the HF config in place: hidden size, the head size pinned (transformers derives it
        from the hidden size when the config has none), the RMSNorm epsilon, the head counts."""
        config.head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        config.hidden_size = self.padded
        config.rms_norm_eps = config.rms_norm_eps * self.real / self.padded
        if self.heads is not None:
            config.num_attention_heads = self.heads.padded_heads
            config.num_key_value_heads = self.heads.padded_kv_heads

    def _is_norm(self, name: str) -> bool:
        module = name.rsplit(".", 1)[0]
        return any(module == n or module.endswith("." + n) for n in FAMILIES[self.family].norm_names())

    def tensor(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """``t`` (HF parameter ``name``, real shape) zero-padded at the end of every axis the
        padded model's ``shape`` widens (hidden features, heads); a hidden-size norm's weight
        rescaled first (float32)."""
        if tuple(t.shape) == tuple(shape):
            return t
        if self._is_norm(name):
            t = (t.float() * self.norm_scale).to(t.dtype)
        pads: list[int] = []
        for have, want in reversed(list(zip(t.shape, shape))):
            if want < have:
                raise ValueError(f"{name}: {tuple(t.shape)} cannot be padded to {tuple(shape)}")
            pads += [0, want - have]
        return torch.nn.functional.pad(t, pads)


    def neutral_smoothing(self, state: dict) -> dict:
        """``state`` (a calibrated layer's tensors, by HF module) with every ``prequant_scaling_factor``
        of a padded input feature set to 1: AWQ's search leaves a degenerate scale there (no
        activation ever reaches it; e.g. 190 against 0.006 on the real features), harmless times a
        zero activation until W4A8's preprocessing divides it by the activation scale in the
        model's dtype, where it overflows to inf and 0 x inf is NaN. The padded features' weights
        and activations are 0, so 1 changes no output; it is the value feature padding writes
        beyond the calibration's width (quantize.feature_padding)."""
        out = dict(state)
        for name, t in state.items():
            if not name.endswith(".prequant_scaling_factor"):
                continue
            first = self._first_padded_input(name, t.shape[-1])
            if first is not None and first < t.shape[-1]:
                t = t.clone()
                t[..., first:] = 1
                out[name] = t
        return out

    def _first_padded_input(self, name: str, width: int) -> int | None:
        """The first padded input feature of HF linear ``name``'s ``prequant_scaling_factor`` (None:
        its inputs are not padded): hidden inputs from the real hidden size, the attention
        output's from the real heads (padded heads come last, quantize.head_padding)."""
        module = name[:-len(".prequant_scaling_factor")]
        for lin in FAMILIES[self.family].linears:
            for hf, (_, din) in zip(lin.hf * len(lin.shapes) if lin.fused else lin.hf, lin.shapes):
                if not module.endswith("." + hf):
                    continue
                if din == "hidden" and width == self.padded:
                    return self.real
                h = self.heads  # padded q heads come last when whole KV groups are added
                whole_groups = h is not None and h.padded_heads * h.kv_heads == h.heads * h.padded_kv_heads
                if din == "q" and whole_groups:
                    return width // h.padded_heads * h.heads
                return None
        return None


def calib_pad(shape) -> CalibPad | None:
    """The calibration padding a checkpoint ``shape`` asks for (None: calibrate as is)."""
    hidden = getattr(shape, "calib_hidden", None) or shape.hidden
    heads = shape.padding if getattr(shape, "calib_heads", False) else None
    if hidden == shape.hidden and heads is None:
        return None
    return CalibPad(shape.family, shape.hidden, hidden, heads)
