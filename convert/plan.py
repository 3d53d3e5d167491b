"""The weight plan: for every rank, the tensors to write and the source slices each is made of.

Built and checked completely (every source tensor present, every shape as the config says) before
a single weight byte is read, so a bad checkpoint fails in seconds with the tensor's name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from common.dtypes import BY_NAME, DType

from common.errors import UserError
from model.families import FAMILIES
from model.shape import Shape
from model.spec import RANK_DIMS, FusedPart, Rule, applies, source_name

from .compute import COMPUTED
from .hf_config import pp_layer_range
from .moe import MoeLayout
from .shard import RULES, Piece, RankCtx, pad_hidden, stacked_shape


@dataclass(frozen=True)
class OutputTensor:
    name: str
    pieces: tuple[Piece, ...]
    shape: tuple[int, ...]
    dtype: DType  # bytes-level (common.dtypes)
    offset: float = 0.0  # added to every element in float32 before the cast (model.spec.Rule)
    scale: float = 1.0   # then multiplied in float32 (RMSNorm weights of a padded hidden size)
    #: computed from its pieces (convert.compute): (rule name, args); None: their copy
    compute: tuple | None = None


def expected_source_shape(name: str, s: Shape) -> tuple[int, ...] | None:
    """The shape a HF tensor must have for this config (None: not checked), from the family spec."""
    return FAMILIES[s.family].expected_shape(name, s)


def _resolve(rule: Rule, i: int | None, source, e: int | None = None) -> tuple:
    names = tuple(n.format(i=i, e=e) for n in rule.sources)
    if all(source_name(n) in source for n in names):
        return names
    if rule.fallback:
        fb = tuple(n.format(i=i) for n in rule.fallback)
        if all(n in source for n in fb):
            return fb
    missing = next(source_name(n) for n in names if source_name(n) not in source)
    raise UserError(f"tensor {missing} is missing from the safetensors in {source.dir}; "
                    f"the checkpoint is incomplete or not a {rule.target.split('.')[0]} model of "
                    f"this config: re-download it")


def _check_shapes(names, source, shape: Shape):
    for n in dict.fromkeys(map(source_name, names)):
        want = expected_source_shape(n, shape)
        got = source.shape(n)
        if want is not None and tuple(got) != want:
            raise UserError(f"tensor {n} in {source.meta[n][0].name} has shape {list(got)} but "
                            f"config.json implies {list(want)}: the weights do not match the config")


def rank_plan(shape: Shape, source, *, tp: int, pp: int, rank: int, dtype: str,
              moe: MoeLayout | None = None) -> list[OutputTensor]:
    """The tensors of one rank (rank = pp_rank * tp + tp_rank), in a fixed order."""
    family = FAMILIES[shape.family]
    pp_rank, tp_rank = divmod(rank, tp)
    moe = moe or MoeLayout(tp, 1)
    ctx = RankCtx(tp_rank=tp_rank, tp=tp, shape=shape, moe_tp=moe.moe_tp,
                  moe_tp_rank=moe.ranks(tp_rank)[0])
    out_dtype = BY_NAME[dtype]
    items: list[tuple[Rule, int | None, int | None]] = []  # (rule, hf layer, local layer)
    if pp_rank == 0:
        items += [(r, None, None) for r in family.embed]
    for local, layer in enumerate(pp_layer_range(shape.layers, pp, pp_rank)):
        items += [(r, layer, local) for r in family.layer]
    if pp_rank == pp - 1:
        items += [(r, None, None) for r in family.head]
    plan = []
    for rule, layer, local in items:
        if not applies(rule.when, shape, layer):
            continue
        if rule.experts:
            plan.append(_expert_stack(rule, layer, local, source, shape, ctx,
                                      moe.experts(shape.experts, tp_rank), out_dtype))
            continue
        names = _resolve(rule, layer, source)
        _check_shapes(names, source, shape)
        pieces = _sharded(rule, names, source, shape, _split_ctx(rule, ctx))
        target = rule.target.format(i=local)
        if rule.shard in COMPUTED:
            out_shape, args, _ = COMPUTED[rule.shard]
            plan.append(OutputTensor(target, tuple(pieces), out_shape(shape, tp), out_dtype,
                                     compute=(rule.shard, args(shape))))
            continue
        pieces = pad_hidden(pieces, rule, shape)
        scale = shape.norm_scale if rule.rms_norm and rule.shapes[0] == ("hidden",) else 1.0
        plan.append(OutputTensor(target, tuple(pieces), stacked_shape(pieces),
                                 BY_NAME[rule.dtype] if rule.dtype else out_dtype, rule.offset,
                                 scale))
    plan.sort(key=lambda t: t.name)
    return plan


def _sharded(rule: Rule, names, source, shape: Shape, ctx: RankCtx) -> list[Piece]:
    """The rule's pieces of this rank; a ``FusedPart`` source is sharded as the tensor of its rows
    alone, then its pieces are read from those rows of the fused tensor."""
    shapes = []
    for n in names:
        full = tuple(source.shape(source_name(n)))
        shapes.append((n.rows(shape)[1], *full[1:]) if isinstance(n, FusedPart) else full)
    pieces = RULES[rule.shard](names, shapes, ctx)
    return [_in_fused(p, shape) if isinstance(p.source, FusedPart) else p for p in pieces]


def _in_fused(p: Piece, shape: Shape) -> Piece:
    """Piece ``p`` of a fused part, as the same rows of the fused tensor."""
    start, count = p.source.rows(shape)
    index = p.index or (slice(None),)
    rows = index[0]
    a, b, _ = rows.indices(count)
    return replace(p, source=p.source.name, index=(slice(start + a, start + b), *index[1:]))


def _split_ctx(rule: Rule, ctx: RankCtx) -> RankCtx:
    """``ctx`` with the laid-out size of the features a column / row rule splits (padded MLP
    intermediate features, model.spec.RANK_DIMS)."""
    dim = rule.split_dim
    if dim not in RANK_DIMS or dim in ("q", "kv"):  # heads: the qkv / dense rules pad them
        return ctx
    return replace(ctx, split_to=RANK_DIMS[dim](ctx.shape))


def _expert_stack(rule: Rule, layer: int, local: int, source, shape: Shape, ctx: RankCtx,
                  experts: range, dtype: DType) -> OutputTensor:
    """[E_local, *one expert's rank tensor]: each expert's pieces in expert order. Row-major,
    that is the pieces stacked along dim 0, so the writer streams it piece by piece (memory
    bounded by a chunk, never by the stack)."""
    pieces: list[Piece] = []
    for e in experts:
        names = _resolve(rule, layer, source, e)
        _check_shapes(names, source, shape)
        pieces += _sharded(rule, names, source, shape, ctx)
    per_expert = stacked_shape(pieces[:len(pieces) // len(experts)])
    return OutputTensor(rule.target.format(i=local), tuple(pieces), (len(experts), *per_expert),
                        dtype)
