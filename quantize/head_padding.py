"""Exact attention-head padding (``--pad-heads``) of the calibrated tensors. The padding is a layout
step of the weight plan, like vocabulary padding, for a tp that does not divide the model's heads:
``model.shape`` chooses the padded counts, the shard rules (``convert.shard``) lay out the float
weights' zero heads as bytes, and this module pads what calibration computed (torch, so it lives
in quantize/).

Whole KV groups are added at the end: each new KV head has zero k/v weights (and biases) and its
group of ``heads / kv_heads`` new q heads has zero q weights (and biases); ``attention.dense`` gets
zero input columns for the new q heads. A new head's q and k are zero, its attention is uniform over
zero values, so its output is exactly zero and the zero dense columns add nothing: the padded model
computes the same function, and the real heads keep their KV head (GQA grouping is unchanged).
Because every padded activation is exactly zero, no quantization statistic depends on it; the
calibration itself runs on the unpadded model (real heads only) and its tensors are padded
afterwards (:func:`pad_quant_state`) with neutral values: 0 for weights, 1 for scales.

The padded count is the smallest number of whole groups that tp can split (``kv % tp == 0`` or
``tp % kv == 0``, as TensorRT-LLM's attention needs). The checkpoint config then carries the padded
``num_attention_heads`` / ``num_key_value_heads`` and an explicit ``head_size`` (TensorRT-LLM 1.2's
``PretrainedConfig`` takes ``head_size`` when given and only otherwise derives it as
``hidden_size // num_attention_heads``; its Llama/Qwen attention is built from ``config.head_size``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from common.errors import UserError
from model.families import FAMILIES
from model.shape import HeadPadding

if TYPE_CHECKING:  # the padding of calibrated tensors computes with torch; the plan does not
    import torch


# ------------------------------------------------------------------------------------------------
# Quantized tensors: which axis carries heads, and the neutral value of a padded channel.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadAxis:
    axis: int            # the axis laid out head by head (rows of q/k/v, input columns of o_proj)
    heads: str           # "q" or "kv": whose head count it follows
    value: float         # padded channels: 0 for weights, 1 for scales and smoothers (neutral)
    ndim: int | None = None  # only tensors of this rank (e.g. AWQ's 2-D group scales of o_proj)


#: HF-module suffix of a tensor of ``quantize.modelopt_state.extract_quant_state`` (unsharded, per HF
#: linear) -> where its heads are. Per-tensor (one-element) scales and tensors not listed carry no
#: head axis (q/k/v smoothers and activation scales are over the hidden input; o_proj's SmoothQuant
#: per-output-channel scales are over hidden) and are left as they are. Packed int4 rows (AWQ) pad
#: with 0 bytes = two zero nibbles. A new quantized format adds its rows here, keyed the same way
#: (unsharded, HF module names, before ``shard_quant_state``), e.g. for TensorRT-LLM's SmoothQuant
#: plugin tensors: the o_proj ``smoother`` [1, q] -> HeadAxis(1, "q", 1.0), q/k/v
#: ``per_channel_scale`` [1, out] -> HeadAxis(1, "q"/"kv", 1.0). Per-token activation scales need
#: nothing: the padded channels are exactly zero, so they never change a token's amax.
def _quant_head_axes() -> dict[str, HeadAxis]:
    """From the family spec: a linear whose output features are heads (q/k/v) has them on axis 0
    of its weight and of its output-side scales; one whose input features are heads (o_proj) on
    axis 1 of its weight and of its 2-D per-block scales, and on axis 0 of its 1-D input-side
    ``prequant_scaling_factor`` (model.spec's companion layouts)."""
    out = {}
    for lin in FAMILIES["llama"].dense_linears():
        for hf, (o, i) in zip(lin.hf, lin.shapes):
            short = hf.rsplit(".", 1)[1]
            if o in ("q", "kv"):
                out[f"{short}.weight"] = HeadAxis(0, o, 0.0)
                out[f"{short}.weights_scaling_factor"] = HeadAxis(0, o, 1.0)  # SQ [out], AWQ [out, in/g]
            elif i in ("q", "kv"):
                out[f"{short}.weight"] = HeadAxis(1, i, 0.0)
                out[f"{short}.weights_scaling_factor"] = HeadAxis(1, i, 1.0, ndim=2)  # AWQ [h, q/g]
                out[f"{short}.prequant_scaling_factor"] = HeadAxis(0, i, 1.0)  # SQ / AWQ smoother [q]
    return out


QUANT_HEAD_AXES = _quant_head_axes()


def pad_axis(t: torch.Tensor, spec: HeadAxis, padding: HeadPadding, name: str = "") -> torch.Tensor:
    """``t`` with its head axis grown from the real to the padded head count, new channels at the
    end filled with ``spec.value``."""
    import torch

    real, padded = padding.count(spec.heads)
    size = t.shape[spec.axis]
    if (size * padded) % real:
        raise UserError(f"{name}: {size} channels do not split into {real} heads, so heads cannot "
                        f"be padded exactly (an AWQ group wider than a head? try --awq-block-size 64)")
    extra = size * padded // real - size
    shape = list(t.shape)
    shape[spec.axis] = extra
    fill = torch.full(shape, spec.value, dtype=torch.float32).to(t.dtype)
    return torch.cat([t, fill], dim=spec.axis)


def pad_quant_state(state: dict, padding: HeadPadding | None) -> dict:
    """The calibrated, unsharded tensors of the real model padded to ``padding``'s head counts."""
    if padding is None or not padding.active:
        return state
    out = {}
    for name, t in state.items():
        spec = next((s for suffix, s in QUANT_HEAD_AXES.items() if name.endswith("." + suffix)), None)
        if spec is None or t.numel() == 1 or (spec.ndim is not None and t.dim() != spec.ndim):
            out[name] = t
        else:
            out[name] = pad_axis(t, spec, padding, name)
    return out


# TensorRT-LLM's plugin SmoothQuant (quantize.smoothquant): its per-layer int8 linears are padded
# after quantization (a zero row would give a per-channel scale of 127 / 0). qkv's rows per q|k|v
# section and dense's input columns are the head axes; o_proj's smoother (dense input) pads with 1.
_Q_ROWS, _KV_ROWS = HeadAxis(0, "q", 0.0), HeadAxis(0, "kv", 0.0)
_ROW_WEIGHTS = ("w_col", "w_tensor")
_ROW_SCALES = ("w_quant_orig_c", "w_quant_orig_t", "y_accum_quant_c", "y_accum_quant_t")


def _pad_sections(t: torch.Tensor, sections, padding: HeadPadding, value: float) -> torch.Tensor:
    import torch

    q, k, v = t.split(list(sections))
    return torch.cat([pad_axis(q, replace(_Q_ROWS, value=value), padding),
                      pad_axis(k, replace(_KV_ROWS, value=value), padding),
                      pad_axis(v, replace(_KV_ROWS, value=value), padding)])


def pad_sq_plugin_layers(layers: list, padding: HeadPadding | None) -> list:
    """``quantize.smoothquant.SmoothedLayer``s of the real model padded to ``padding``'s heads:
    zero int8 rows (qkv) and input columns (dense), neutral scales and smoother (1)."""
    if padding is None or not padding.active:
        return layers
    out = []
    for layer in layers:
        mha = padding.heads == padding.kv_heads  # as plugin_rank_tensors derives it
        q8 = dict(layer.int8(mha))
        sections = layer.qkv.sections
        qkv = q8["qkv"]
        # a layer from the calibration store has one of the two int8 weights (None: unused)
        q8["qkv"] = replace(qkv, **{f: _pad_sections(getattr(qkv, f), sections, padding, 0.0)
                                   for f in _ROW_WEIGHTS if getattr(qkv, f) is not None},
                            **{f: _pad_sections(getattr(qkv, f), sections, padding, 1.0)
                               for f in _ROW_SCALES})
        dense = q8["dense"]
        q8["dense"] = replace(dense, **{f: pad_axis(getattr(dense, f), HeadAxis(1, "q", 0.0), padding)
                                       for f in _ROW_WEIGHTS if getattr(dense, f) is not None})
        padded_sections = tuple(s * padding.count(kind)[1] // padding.count(kind)[0]
                                for s, kind in zip(sections, ("q", "kv", "kv")))
        out.append(replace(layer, qkv=replace(layer.qkv, sections=padded_sections),
                           dense_smoother=pad_axis(layer.dense_smoother, HeadAxis(0, "q", 1.0),
                                                   padding),
                           _int8=q8))
    return out
