"""Quantization in the converter: preflight of a format against the model's per-rank shapes, and the
calibrated tensors placed into the converter's per-rank weight plan.

The float plan (``convert.plan.rank_plan``) streams every tensor from the source shards. For a
calibrated format (SmoothQuant, FP8, AWQ, KV cache) the five linears of each layer are replaced by
what :func:`quantize.modelopt_state.shard_quant_state` computes for that rank (quantized weight and its
scales, modelopt's names, shapes, dtypes and values), and the KV-cache scales are added; norms,
embedding and lm_head still stream from the source, as modelopt writes them unchanged. Weight-only
formats (W8A16/W4A16) keep the float plan entirely: trtllm-build quantizes the weights.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from common.errors import UserError
from model.families import FAMILIES
from model.spec import PADDABLE_DIMS, REPLICATED, RESCALED_DIMS

if TYPE_CHECKING:  # the converter's model shape; only its attributes are read here
    import torch  # annotations only: the float path imports this module without torch

    from model.shape import Shape

from .formats import QuantSpec, check_kv_head_duplication


@dataclass(frozen=True)
class MemoryTensor:
    """An output tensor computed in memory (calibrated weights and scales), in a rank's plan next to
    ``convert.plan.OutputTensor``s (which stream from the source)."""

    name: str
    tensor: torch.Tensor
    pieces: tuple = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def chunks(self):
        """The tensor as the writer's ByteChunks (convert/ never imports torch)."""
        from .torch_io import tensor_chunk

        yield tensor_chunk(self.tensor)


def per_rank_in_dims(shape: Shape, tp: int) -> dict[str, int]:
    """Input features of each quantizable dense linear on one rank (TensorRT-LLM names)."""
    return {lin.name: lin.rank_features(shape, tp)[1] for lin in _dense_linears(shape)}


def per_rank_out_dims(shape: Shape, tp: int) -> dict[str, int]:
    """Output features of each quantizable dense linear on one rank (kv heads duplicated when tp > kv)."""
    return {lin.name: lin.rank_features(shape, tp)[0] for lin in _dense_linears(shape)}


def _dense_linears(shape: Shape):
    # a MoE model's experts are checked by quantize.moe.preflight_moe_quant
    return FAMILIES[shape.family].dense_linears(shape)


def _full_features(lin, shape: Shape, tp: int) -> tuple[tuple[int, frozenset], tuple[int, frozenset]]:
    """((out, dims), (in, dims)): ``lin``'s features before the tp split, as TensorRT-LLM's model
    builds the linear (quantize_layers: column out x tp, row in x tp), and the spec's dim names
    they are made of (model.spec.DIMS)."""
    out_r, in_r = lin.rank_features(shape, tp)
    split = tp if lin.shard != REPLICATED else 1  # a linear built whole (DeepSeek's fused_a)
    out = out_r * split if lin.column_parallel else out_r
    inp = in_r if lin.column_parallel else in_r * split
    return ((out, frozenset(o for o, _ in lin.shapes)), (inp, frozenset({lin.shapes[0][1]})))


def _padded_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_features(spec: QuantSpec | None, shape: Shape, tp: int,
                 valid_tps: Callable[[], list[int]] = list) -> Shape:
    """``shape`` with the features TensorRT-LLM's linears of ``spec``'s format pad
    (``Recipe.feature_multiple`` x tp) padded exactly: the MLP's intermediate features (zero,
    model.spec.PADDABLE_DIMS) and the hidden size (zero, norms rescaled, model.spec.RESCALED_DIMS;
    unless the family says why not, ``Family.hidden_padding``). UserError naming the valid --tp
    values when another dim (q/k/v heads) is not a multiple (its padded linears would not meet
    the unpadded activations: TensorRT-LLM pads no activation). MoE experts are not padded
    (layers/moe.py)."""
    m = spec.format.feature_multiple(spec) if spec is not None else None
    if m is None:
        return shape
    multiple = m * tp
    padded: set[str] = set()
    family = FAMILIES[shape.family]
    for lin in _dense_linears(shape):
        lin_multiple = m if lin.shard == REPLICATED else multiple  # built with tp_size 1
        for what, (n, dims) in zip(("output", "input"), _full_features(lin, shape, tp)):
            if n % lin_multiple == 0:
                continue
            if dims <= PADDABLE_DIMS or (dims <= RESCALED_DIMS and family.hidden_padding is None):
                padded |= dims
                continue
            valid = valid_tps()
            tps = f"valid --tp values: {', '.join(map(str, valid))}" if valid else \
                f"no --tp value keeps them whole: {spec.format.feature_fix(spec)}"
            why = (f" (the hidden size cannot be padded: {family.hidden_padding})"
                   if dims <= RESCALED_DIMS else "")
            raise UserError(f"{spec.quant_algo}: TensorRT-LLM's {spec.format.padding_layer} pads a "
                            f"linear's input and output features to a multiple of {m} x tp = "
                            f"{multiple} and no activation (tensorrt_llm/quantization/layers.py): "
                            f"{lin.name}'s {n} {what} features would not meet the model's{why}; "
                            f"{tps}")
    if "inter" in padded:
        shape = replace(shape, padded_inter=_padded_to(shape.inter, multiple))
    if "hidden" in padded:
        shape = replace(shape, padded_hidden=_padded_to(shape.hidden, multiple))
    return shape


def calibration_layout(spec: QuantSpec, shape: Shape) -> Shape:
    """``shape`` with the padding its calibration needs (quantize.calib_padding): the hidden
    size and the heads as the checkpoint pads them, where the real ones are not whole groups of
    the format's calibration blocks (AWQ 128 on SmolLM2's 576 hidden / 9 heads of 64)."""
    block = spec.format.calibration_block(spec)
    if shape.padded_hidden and shape.hidden % block:
        shape = replace(shape, calib_hidden=_padded_to(shape.hidden, block))
    if shape.padding is not None and shape.padding.active and (shape.heads * shape.head_size) % block:
        shape = replace(shape, calib_heads=True)
    return shape


def preflight_quant(spec: QuantSpec | None, shape: Shape, tp: int, pp: int,
                    valid_tps: Callable[[], list[int]] = list) -> Shape:
    """Refuse, before calibration or any read, a format the model's per-rank shapes cannot take
    (:func:`pad_features`, the recipe's :meth:`check_linear_shapes` and :meth:`check_tp`);
    returns ``shape`` with the format's feature padding."""
    if spec is None:
        return shape
    shape = calibration_layout(spec, pad_features(spec, shape, tp, valid_tps))
    # calibration runs on the unpadded model (the dense input before head padding, the full MLP)
    # unless calibration_layout pads it
    unpadded = {} if shape.padding is None or shape.calib_heads else \
        {"attention.dense (unpadded)": shape.heads * shape.head_size}
    if shape.padded_inter:
        unpadded["mlp.proj (unpadded)"] = shape.inter
    if shape.padded_hidden:
        unpadded["attention.qkv (calibrated hidden)"] = shape.calib_hidden or shape.hidden
    spec.format.check_linear_shapes(spec, per_rank_in_dims(shape, tp), per_rank_out_dims(shape, tp), unpadded)
    check_kv_head_duplication(spec, shape.tp_kv_heads, tp)
    return shape


def vocab_multiple(spec: QuantSpec | None) -> int:
    return 1 if spec is None else spec.format.vocab_multiple


_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.*)$")


def stage_tensors(rank_tensors: Mapping[str, torch.Tensor], layers: range) -> dict[str, torch.Tensor]:
    """One pipeline stage's share of ``rank_tensors`` (global layer numbers), renumbered from 0
    as TensorRT-LLM numbers a stage's layers."""
    out = {}
    for name, t in rank_tensors.items():
        m = _LAYER.match(name)
        if m is None:
            raise AssertionError(f"unexpected quantized tensor {name}")
        i = int(m.group(1))
        if i in layers:
            out[f"transformer.layers.{i - layers.start}.{m.group(2)}"] = t
    return out


def apply_to_plan(plan: list, tensors: Mapping[str, torch.Tensor]) -> list:
    """``plan`` with the entries named in ``tensors`` replaced by them and the others added, sorted
    by name as the float plan is."""
    replaced = {t.name for t in plan} & set(tensors)
    for name in replaced:
        planned = next(t for t in plan if t.name == name)
        got = tensors[name]
        # a quantized weight may change dtype and (packed int4) its row count, never its meaning
        if len(got.shape) != len(planned.shape):
            raise AssertionError(f"{name}: calibrated {list(got.shape)} vs planned {list(planned.shape)}")
    out = [t for t in plan if t.name not in replaced]
    out += [t if isinstance(t, StagedTensor) else MemoryTensor(name, t.contiguous())
            for name, t in tensors.items()]
    out.sort(key=lambda t: t.name)
    return out


class StagedTensor:
    """An output tensor read from the calibration store only when the writer reaches it (one
    layer's shards cached at a time, see :class:`LayerShards`), so that a rank's quantized
    tensors are never all in memory."""

    pieces = ()

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, load):
        self.name, self.shape, self.dtype, self._load = name, tuple(shape), dtype, load

    @property
    def tensor(self) -> torch.Tensor:
        return self._load()

    chunks = MemoryTensor.chunks


class LayerShards:
    """One tp rank's TensorRT-LLM tensors of one layer, from the calibration store, the last one
    asked for kept (the writer goes through a rank's layers in order). ``shard(i, layer, tp_rank)``
    cuts what ``load_layer(i)`` returns into a rank's tensors (global layer names); default:
    modelopt's formats (:func:`quantize.modelopt_state.shard_quant_state`) laid out by
    ``family``'s spec (default Llama's)."""

    def __init__(self, load_layer, spec: QuantSpec, *, num_heads: int, num_kv_heads: int, tp: int,
                 shard=None, family=None):
        self.load_layer, self.spec, self.tp, self.family = load_layer, spec, tp, family
        self.heads = (num_heads, num_kv_heads)
        self.shard = shard or self._modelopt_shard
        self._key, self._value = None, None

    def _modelopt_shard(self, i: int, state, tp_rank: int) -> dict[str, torch.Tensor]:
        from .modelopt_state import shard_quant_state

        family = {} if self.family is None else {"family": self.family}
        return shard_quant_state(state, self.spec, num_heads=self.heads[0],
                                 num_kv_heads=self.heads[1], tp=self.tp, rank=tp_rank, **family)

    def get(self, layer: int, tp_rank: int) -> dict[str, torch.Tensor]:
        if self._key != (layer, tp_rank):
            self._value = None  # free the previous layer first
            self._value = self.shard(layer, self.load_layer(layer), tp_rank)
            self._key = (layer, tp_rank)
        return self._value

    def staged(self, layers: range, tp_rank: int) -> dict[str, StagedTensor]:
        """The stage's tensors (renumbered from 0) as StagedTensors; reads each layer once here
        for the shapes."""
        out = {}
        for i in layers:
            for name, t in self.get(i, tp_rank).items():
                local = stage_tensors({name: t}, layers)
                (lname,) = local
                out[lname] = StagedTensor(lname, t.shape, t.dtype,
                                          lambda i=i, n=name: self.get(i, tp_rank)[n].contiguous())
        self._key = self._value = None
        return out
