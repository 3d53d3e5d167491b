"""TensorRT-LLM's plugin SmoothQuant's view of the family spec (model.families): which linears it
quantizes, which share a smoother, where their input scales live. Derived, not written out."""
from __future__ import annotations

from model.families import FAMILIES

#: the decoder layout the plugin recipe handles: the Llama family's spec
LAYOUT = FAMILIES["llama"]
#: HF module in the layer of each dense linear, by HF short name ("q_proj": "self_attn.q_proj")
HF_MODULES = {h.rsplit(".", 1)[1]: h for h in LAYOUT.hf_linears()}
#: SmoothedLayer's field of each TensorRT-LLM linear ("qkv", "dense", "fc", "gate", "proj")
FIELDS = {lin.name.rsplit(".", 1)[1]: lin for lin in LAYOUT.dense_linears()}


def _tables():
    groups: dict[str, tuple[str, ...]] = {}
    group_fields: dict[str, tuple[str, ...]] = {}
    scales: dict[str, str] = {}
    for field, lin in FIELDS.items():
        key = lin.group or field
        groups[key] = groups.get(key, ()) + tuple(h.rsplit(".", 1)[1] for h in lin.hf)
        group_fields[key] = group_fields.get(key, ()) + (field,)
        home = (f"{LAYOUT.input_norm(lin)}.scale_to_int" if lin.norm is not None
                else f"{lin.name.split('.')[0]}.quantization_scaling_factor")
        scales.setdefault(home, field)
    return groups, group_fields, scales


#: SMOOTH_GROUPS: the weights that share a smoother, by HF short name. TensorRT-LLM smooths each
#: fusion group jointly into the norm that feeds it and keeps one ``smoother`` per other linear:
#: {"qkv": (q, k, v), "dense": (o,), "gate_up": (gate, up), "proj": (down,)}.
#: GROUP_FIELDS: the same groups by SmoothedLayer field: {..., "gate_up": ("fc", "gate"), ...}.
#: INPUT_SCALES: where a linear's static input scale lives -> the first linear that reads it
#: (a norm's ``scale_to_int``, else its block's ``quantization_scaling_factor``).
SMOOTH_GROUPS, GROUP_FIELDS, INPUT_SCALES = _tables()
