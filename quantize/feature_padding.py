"""The MLP's intermediate features padded as TensorRT-LLM's weight-only / AWQ linears declare them
(``Shape.padded_inter``, set by quantize.apply.pad_features): the calibrated tensors
(computed with torch here, in quantize/; the float weights are padded by convert.shard).

TensorRT-LLM 1.x's ``WeightOnlyQuantLinear`` / ``WeightOnlyQuantRowLinear`` and
``WeightOnlyGroupwiseQuantLinear`` / ``RowLinear`` (tensorrt_llm/quantization/layers.py) round
their full in and out features up to a multiple of (64, or max(64, group)) x tp, and the checkpoint
loader (models/modeling_utils.py preprocess_weights, then load) only checks that each rank's
tensors have those shapes: it pads nothing. No activation is padded or sliced in their forward
either, so padding is exact only for features that padded linears produce and consume on both
sides: the MLP's intermediate features (fc / gate outputs, proj input). They are zero: zero fc and
gate rows give zero outputs, silu(0) x 0 = 0, and proj's zero input columns add nothing.

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
from model.spec import PADDABLE_DIMS

from .head_padding import HeadAxis

if TYPE_CHECKING:
    import torch


def _feature_axes() -> dict[str, HeadAxis]:
    """HF-module suffix (unsharded, per HF linear) -> the axis carrying padded features. A linear
    whose output features are paddable (gate_proj, up_proj) has them on axis 0 of its weight and
    of its output-side scales; one whose input features are (down_proj) on axis 1 of its weight
    and of its 2-D per-group scales, and on axis 0 of its 1-D pre-quant scale."""
    out = {}
    for lin in FAMILIES["llama"].dense_linears():
        for hf, (o, i) in zip(lin.hf, lin.shapes):
            short = hf.rsplit(".", 1)[1]
            if o in PADDABLE_DIMS:
                out[f"{short}.weight"] = HeadAxis(0, o, 0.0)
                out[f"{short}.weights_scaling_factor"] = HeadAxis(0, o, 1.0)
            elif i in PADDABLE_DIMS:
                out[f"{short}.weight"] = HeadAxis(1, i, 0.0)
                out[f"{short}.weights_scaling_factor"] = HeadAxis(1, i, 1.0, ndim=2)
                out[f"{short}.prequant_scaling_factor"] = HeadAxis(0, i, 1.0)
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
    with the MLP's intermediate features padded to ``shape.padded_inter``."""
    padded = getattr(shape, "padded_inter", None)
    if not padded or padded == shape.inter:
        return state
    out = {}
    for name, t in state.items():
        spec = next((s for suffix, s in FEATURE_AXES.items() if name.endswith("." + suffix)), None)
        if spec is None or t.numel() == 1 or (spec.ndim is not None and t.dim() != spec.ndim):
            out[name] = t
        else:
            out[name] = _pad(t, spec, shape.inter, padded, name)
    return out
