"""The MLP's intermediate features and the hidden size padded as TensorRT-LLM's weight-only / AWQ
linears declare them (``Shape.padded_inter`` / ``padded_hidden``, set by
quantize.apply.pad_features): the calibrated tensors (computed with torch here, in quantize/; the
float weights are padded by convert.shard).

TensorRT-LLM 1.x's ``WeightOnlyQuantLinear`` / ``WeightOnlyQuantRowLinear`` and
``WeightOnlyGroupwiseQuantLinear`` / ``RowLinear`` (tensorrt_llm/quantization/layers.py) round
their full in and out features up to a multiple of (64, or max(64, group)) x tp, and the checkpoint
loader (models/modeling_utils.py preprocess_weights, then load) only checks that each rank's
tensors have those shapes: it pads nothing. No activation is padded or sliced in their forward
either, so padding is exact only for features that padded linears produce and consume on both
sides: the MLP's intermediate features (fc / gate outputs, proj input). They are zero: zero fc and
gate rows give zero outputs, silu(0) x 0 = 0, and proj's zero input columns add nothing. The
hidden features are the other exception, once the norms over them are rescaled
(model.spec.RESCALED_DIMS): zero embedding columns and zero dense / proj output rows keep the
padded residual features at exactly 0, and every linear reading them has zero input columns.

The float weights and biases are padded by the shard rules (convert.shard ``column`` / ``row``
with ``RankCtx.split_to``). Calibrated tensors are computed on the real model and padded here,
unsharded, before the tp split (the padding is at the end of the full dim, as TensorRT-LLM's own
HF loader lays it out: ``postprocess_weight_only`` splits by the padded per-rank size, then pads):
weights with 0 (a packed int4 byte of 0 is two zero nibbles), weight scales and pre-quant scales
with 1 (neutral; they only ever multiply zero weights or zero activations).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import UserError
from model.families import FAMILIES
from model.spec import PADDABLE_DIMS, RESCALED_DIMS

from .head_padding import HeadAxis

if TYPE_CHECKING:
    import torch


def _feature_axes() -> dict[str, tuple[HeadAxis, ...]]:
    """HF-module suffix (unsharded, per HF linear) -> the axes carrying padded features, each
    naming its dim (``HeadAxis.heads``: "inter" or "hidden"). A linear's padded output features
    are on axis 0 of its weight and of its output-side scales; its padded input features on
    axis 1 of its weight and of its 2-D per-group scales, and on axis 0 of its 1-D pre-quant
    scale. down_proj has both (hidden out, inter in)."""
    out: dict[str, tuple[HeadAxis, ...]] = {}
    padded = PADDABLE_DIMS | RESCALED_DIMS

    def add(key, axis):
        out[key] = out.get(key, ()) + (axis,)

    for lin in FAMILIES["llama"].dense_linears():
        for hf, (o, i) in zip(lin.hf, lin.shapes):
            short = hf.rsplit(".", 1)[1]
            if o in padded:
                add(f"{short}.weight", HeadAxis(0, o, 0.0))
                add(f"{short}.weights_scaling_factor", HeadAxis(0, o, 1.0))
            if i in padded:
                add(f"{short}.weight", HeadAxis(1, i, 0.0))
                add(f"{short}.weights_scaling_factor", HeadAxis(1, i, 1.0, ndim=2))
                add(f"{short}.prequant_scaling_factor", HeadAxis(0, i, 1.0, ndim=1))
    return out


FEATURE_AXES = _feature_axes()


def _pad(t: torch.Tensor, spec: HeadAxis, real: int, padded: int, name: str) -> torch.Tensor:
    import torch

    size = t.shape[spec.axis]
    if (size * padded) % real:
        raise UserError(f"{name}: {size} channels do not follow {real} features, so they cannot be "
                        f"padded to {padded} exactly")
    shape = list(t.shape)
    shape[spec.axis] = size * padded // real - size
    fill = torch.full(shape, spec.value, dtype=torch.float32).to(t.dtype)
    return torch.cat([t, fill], dim=spec.axis)


def pad_feature_state(state: dict, shape) -> dict:
    """The calibrated, unsharded tensors of the real model (quantize.modelopt_state's HF names)
    with the MLP's intermediate features padded to ``shape.padded_inter`` and the hidden
    features to ``shape.padded_hidden`` (from ``shape.calib_hidden`` where the calibration ran
    padded: quantize.calib_padding)."""
    sizes = {"inter": (shape.inter, getattr(shape, "padded_inter", None)),
             "hidden": (getattr(shape, "calib_hidden", None) or getattr(shape, "hidden", None),
                        getattr(shape, "padded_hidden", None))}
    sizes = {d: rp for d, rp in sizes.items() if rp[1] and rp[1] != rp[0]}
    if not sizes:
        return state
    out = {}
    for name, t in state.items():
        axes = next((a for suffix, a in FEATURE_AXES.items() if name.endswith("." + suffix)), ())
        if t.numel() > 1:
            for spec in axes:
                if spec.heads in sizes and (spec.ndim is None or t.dim() == spec.ndim):
                    t = _pad(t, spec, *sizes[spec.heads], name)
        out[name] = t
    return out
