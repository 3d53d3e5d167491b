"""Quantized companions of a linear's weight (scales, smoothers): their layout and the axis a
shard rule splits them along (see ``model.spec``'s docstring)."""
from __future__ import annotations

COLUMN_PARALLEL = frozenset({"column", "qkv", "vocab", "expert_column"})


#: companion layouts: what axis of the weight a quantization tensor runs along
PER_TENSOR, PER_OUTPUT, PER_INPUT, PER_BLOCK = "tensor", "output", "input", "block"
#: TensorRT-LLM companion suffix -> layout (weights_scaling_factor's depends on its shape)
COMPANIONS = {
    "activation_scaling_factor": PER_TENSOR, "act_scale": PER_TENSOR,
    "prequant_scaling_factor": PER_INPUT, "smoother": PER_INPUT,
    "per_channel_scale": PER_OUTPUT,
}


def companion_layout(kind: str, ndim: int, numel: int) -> str:
    """The layout of a companion tensor ``kind`` (a suffix such as ``weights_scaling_factor``) of
    this many dimensions / elements: one element is per-tensor whatever its name."""
    if numel == 1:
        return PER_TENSOR
    if kind == "weights_scaling_factor":
        return PER_BLOCK if ndim == 2 else PER_OUTPUT  # AWQ [out, in/group]; SQ [out]
    return COMPANIONS[kind]


def companion_axis(shard: str, layout: str) -> int | None:
    """The axis along which a companion of ``layout`` is split for a linear sharded by ``shard``
    (None: replicated). Output-side tensors split where the weight's rows do; input-side ones
    where its columns do; a per-block scale exactly as the weight."""
    column = shard in COLUMN_PARALLEL
    if layout == PER_TENSOR:
        return None
    if layout == PER_BLOCK:
        return 0 if column else 1
    if layout == PER_OUTPUT:
        return 0 if column else None
    if layout == PER_INPUT:
        return None if column else -1
    raise ValueError(f"unknown companion layout {layout!r}")
