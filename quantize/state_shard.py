"""The reference for naming and splitting modelopt's per-HF-module quantized tensors
(:func:`quantize.modelopt_state.extract_quant_state`) into one TP rank's TensorRT-LLM tensors
(``transformer.layers.{i}.attention.qkv.*`` ...), as modelopt 0.47's export does for separate HF
modules, and as the family spec lays out a fused one (Phi-3's ``qkv_proj`` / ``gate_up_proj``:
``model.spec.Linear.fused``), whose output-side tensors are cut into its parts first.

Imports no project module but the family specs (quantize.modelopt_state imports this one).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from common.errors import UserError
from model.families import FAMILIES
from model.spec import DIMS, PER_BLOCK, QKV, Linear, companion_axis, companion_layout

Tensor = torch.Tensor

#: The decoder layout these recipes calibrate when no family is named (names, fusion, shard
#: rules): the Llama family's spec; a Mixtral layer's experts are quantize/moe.py's.
LAYOUT = FAMILIES["llama"]
HF_ATTENTION, TRT_ATTENTION = LAYOUT.attention
KV_SCALES = ("k_cache_scaling_factor", "v_cache_scaling_factor", "kv_cache_scaling_factor")
SUFFIXES = ("weight", "weights_scaling_factor", "weights_scaling_factor_2",
            "activation_scaling_factor", "prequant_scaling_factor")


def _chunk(t: Tensor, tp: int, rank: int, dim: int) -> Tensor:
    if t.shape[dim] % tp:
        raise UserError(f"cannot split a dimension of size {t.shape[dim]} across {tp} ranks")
    return torch.chunk(t, tp, dim=dim)[rank].contiguous()


def _dup_kv(t: Tensor, rows_per_head: int, num_kv_heads: int, tp: int) -> Tensor:
    """modelopt's dup_kv_weight: repeat each kv head's rows so that every rank gets its head."""
    if tp <= num_kv_heads:
        return t
    reps = tp // num_kv_heads
    shape = t.shape
    return t.reshape(num_kv_heads, rows_per_head, *shape[1:]).repeat_interleave(reps, dim=0).reshape(
        num_kv_heads * reps * rows_per_head, *shape[1:])


class PartSizes:
    """The sizes ``model.spec.DIMS`` reads, as far as the rank split knows them: heads and kv
    heads (padded, as the state is), a head size of one and every other dim one. A fused HF
    module's parts are then cut in proportion: exact for Phi-3's [q; k; v] (heads) and
    [gate; up] (equal halves), the only fused modules the specs declare."""

    head_size = hidden = inter = 1

    def __init__(self, num_heads: int, num_kv_heads: int):
        self.heads, self.kv_heads = num_heads, num_kv_heads


def _fused_parts(t: Tensor, lin: Linear, sizes: PartSizes) -> list[Tensor]:
    """The rows of fused tensor ``t`` (weight, packed int4 weight or per-row / per-block scales)
    of each part, in the linear's order (``Linear.fused``)."""
    units = [DIMS[o](sizes) for o, _ in lin.shapes]
    if t.shape[0] % sum(units):
        raise UserError(f"{lin.hf[0]}: {t.shape[0]} rows do not split into its parts {units}")
    per = t.shape[0] // sum(units)
    pieces = torch.split(t, [u * per for u in units])
    return [pieces[k] for k in lin.fused]


def _sources(state: Mapping[str, Tensor], src: str, lin: Linear, suffix: str, axis,
             sizes: PartSizes) -> list[Tensor]:
    """The ``suffix`` tensor of each source of ``lin`` in its fused order: one per HF module, or
    the parts of one fused module (split on the rows when they run along the outputs)."""
    if not lin.fused:
        return [state[f"{src}.{h}.{suffix}"] for h in lin.hf]
    t = state[f"{src}.{lin.hf[0]}.{suffix}"]
    return _fused_parts(t, lin, sizes) if axis == 0 else [t]


def _qkv_rank(parts: list[Tensor], num_heads: int, num_kv_heads: int, tp: int,
              rank: int) -> Tensor:
    """Rank ``rank``'s [q_r; k_r; v_r] of a tensor (weight, or per-row scales) of the q/k/v
    sources ``parts``, k/v heads duplicated first when tp > kv heads."""
    rows_per_head = parts[0].shape[0] // num_heads
    out = []
    for j, t in enumerate(parts):
        if j:
            t = _dup_kv(t, rows_per_head, num_kv_heads, tp)
        out.append(_chunk(t, tp, rank, 0))
    return torch.cat(out)


def _rank_tensor(state: Mapping[str, Tensor], src: str, lin: Linear, suffix: str, *,
                 num_heads: int, num_kv_heads: int, tp: int, rank: int) -> Tensor:
    """One rank's ``suffix`` tensor of ``lin``, placed by the spec's companion rule: the weight
    and per-block scales as the weight's shard, per-output / per-input tensors along the split
    side, per-tensor ones replicated (model.spec.companion_axis); the sources of one linear
    (separate modules, or the parts of a fused one) each split, then concatenated."""
    t = state[f"{src}.{lin.hf[0]}.{suffix}"]
    layout = PER_BLOCK if suffix == "weight" else companion_layout(suffix, t.dim(), t.numel())
    axis = companion_axis(lin.shard, layout)
    if axis is None:
        return t.clone()
    parts = _sources(state, src, lin, suffix, axis, PartSizes(num_heads, num_kv_heads))
    if lin.shard != QKV:
        return torch.cat([_chunk(p, tp, rank, axis) for p in parts]) if len(parts) > 1 else \
            _chunk(parts[0], tp, rank, axis)
    if suffix != "weight" and tp > num_kv_heads and t.dim() == 1:
        raise UserError("SmoothQuant cannot duplicate per-channel k/v scales for kv heads < tp")
    return _qkv_rank(parts, num_heads, num_kv_heads, tp, rank)


def shard_quant_state(state: Mapping[str, Tensor], spec, *, num_heads: int, num_kv_heads: int,
                      tp: int, rank: int, layer_prefix: str = "model.layers",
                      family=LAYOUT) -> dict[str, Tensor]:
    """One TP rank's quantization tensors with TensorRT-LLM names, from ``extract_quant_state``.

    Split rules (modelopt 0.47 ``postprocess._split_model_config_for_tp`` + ``build_qkv``), as
    the family spec places companions: column-parallel (q/k/v per head, mlp.fc, mlp.gate): weight
    rows (packed int4: rows/2), per-channel / per-group weight scales split on dim 0; prequant and
    activation scales replicated. Row-parallel (attention.dense, mlp.proj): weight and AWQ group
    scales split on dim 1, prequant split on dim 0, SmoothQuant per-channel weight scales (one
    per output row) and activation scales replicated. Per-tensor (FP8) and KV scales replicated.
    kv heads < tp: k/v rows duplicated per head first (modelopt refuses this for SmoothQuant).
    A fused HF module (``Linear.fused``): its weight rows and per-row / per-block scales cut into
    its parts, each part split as a separate module would be, in the linear's order (Phi-3's
    mlp.fc: [up_r; gate_r]); its per-tensor and input-side tensors are the linear's.
    The float parts (biases, norms, embeddings, lm_head) are the converter's; only weight, the
    scaling factors and the KV scales are returned. ``family``: the spec whose dense linears the
    state holds (a MoE family's shared expert: fc = [up; gate], each split, per rank).
    """
    export = spec.format.linear_export
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, tp=tp, rank=rank)
    out: dict[str, Tensor] = {}
    idx = sorted({int(m.group(1)) for k in state
                  for m in [re.match(re.escape(layer_prefix) + r"\.(\d+)\.", k)] if m})
    for i in idx:
        src = f"{layer_prefix}.{i}"
        dst = f"transformer.layers.{i}"
        for lin in family.dense_linears() if export is not None else ():
            if f"{src}.{lin.hf[0]}.weight" not in state:  # a MoE layer's experts: quantize/moe.py
                continue
            for suffix in SUFFIXES:
                if suffix in SUFFIXES[:2] or f"{src}.{lin.hf[0]}.{suffix}" in state:
                    out[f"{dst}.{lin.name}.{suffix}"] = _rank_tensor(state, src, lin, suffix, **kw)
        for name in KV_SCALES:
            key = f"{src}.{HF_ATTENTION}.{name}"
            if key in state:
                out[f"{dst}.{TRT_ATTENTION}.{name}"] = state[key].clone()
    return out


def quant_state_names(spec) -> Iterable[str]:
    """Suffixes each quantized TensorRT-LLM linear carries for ``spec`` (besides bias)."""
    export = spec.format.linear_export
    return () if export is None else export.tensors
