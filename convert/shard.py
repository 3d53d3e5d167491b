"""Shard rules: which slices of which source tensors make one rank's tensor.

A rule returns a list of ``Piece``s stacked along dim 0: a slice of a source tensor, or zero rows
(vocabulary and head padding); a piece may end in zero columns (head padding of attention.dense). Shapes therefore follow from the pieces without reading any data, which lets
the writer lay out a file's header before a byte of weights is read.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.shape import Shape, padded_vocab


@dataclass(frozen=True)
class Piece:
    source: str | None                # None: zero padding
    index: tuple[slice, ...]          # slices into the source tensor (empty: all of it)
    shape: tuple[int, ...]            # shape of this piece
    pad_cols: int = 0                 # zero columns appended (head padding of attention.dense)


@dataclass(frozen=True)
class RankCtx:
    tp_rank: int
    tp: int
    shape: Shape
    moe_tp: int = 1        # experts' intermediate split (convert.moe)
    moe_tp_rank: int = 0
    #: ``column`` / ``row``: the split features as the checkpoint lays them out (None: the
    #: source's); beyond the source's size they are zero (the MLP's intermediate features padded
    #: as TensorRT-LLM's weight-only / AWQ linears declare them, model.spec.PADDABLE_DIMS)
    split_to: int | None = None


def _rows(name: str, full: tuple[int, ...], start: int, stop: int) -> Piece:
    return Piece(name, (slice(start, stop),), (stop - start, *full[1:]))


def replicated(names, shapes, ctx):
    """The same on every rank; several sources are stacked along dim 0 in order (DeepSeek's
    ``fused_a`` = q_a_proj ++ kv_a_proj_with_mqa)."""
    return [Piece(n, (), full) for n, full in zip(names, shapes)]


def column(names, shapes, ctx):
    """Split dim 0; padded features (``ctx.split_to``) are zero rows at the end of the full dim,
    which is then split evenly (the last ranks hold them). Several sources (a fused linear such
    as Phi-3's mlp.fc = [up; gate], DeepSeek's and Qwen2-MoE's shared expert fc = [up; gate]):
    each split so, this rank's rows of each one after another."""
    pieces = []
    for name, full in zip(names, shapes):
        k = (ctx.split_to or full[0]) // ctx.tp
        start = ctx.tp_rank * k
        stop = min(start + k, full[0])
        if stop > start:
            pieces.append(_rows(name, full, start, stop))
        pad = k - max(0, stop - start)
        if pad:
            pieces.append(Piece(None, (), (pad, *full[1:])))
    return pieces


def row(names, shapes, ctx):
    """Split dim 1; padded features (``ctx.split_to``) are zero columns, as in ``column``."""
    full = shapes[0]
    k = (ctx.split_to or full[1]) // ctx.tp
    a = ctx.tp_rank * k
    b = min(a + k, full[1])
    if b <= a:
        return [Piece(None, (), (full[0], k))]
    return [Piece(names[0], (slice(None), slice(a, b)), (full[0], k), pad_cols=k - (b - a))]


def dense(names, shapes, ctx):
    """attention.dense: ``row``, over the padded q heads when heads are padded (zero columns for
    the new heads, which come last)."""
    s = ctx.shape
    if s.padding is None:
        return row(names, shapes, ctx)
    full, hd = shapes[0], s.head_size
    k = s.tp_heads * hd // ctx.tp
    a = ctx.tp_rank * k
    b = min(a + k, s.heads * hd)
    if b <= a:
        return [Piece(None, (), (full[0], k))]
    return [Piece(names[0], (slice(None), slice(a, b)), (full[0], k), pad_cols=k - (b - a))]


def _head_rows(name, full, heads: range, real: int, hd: int) -> list[Piece]:
    """Rows of ``heads`` (head_size ``hd`` rows each); heads >= ``real`` are zero padding."""
    pieces = []
    stop = min(heads.stop, real)
    if stop > heads.start:
        pieces.append(_rows(name, full, heads.start * hd, stop * hd))
    pad = heads.stop - max(heads.start, stop)
    if pad:
        pieces.append(Piece(None, (), (pad * hd, *full[1:])))
    return pieces


def kv_heads_for_rank(kv: int, tp: int, rank: int) -> range:
    """The kv heads rank ``rank`` holds: its share, or the one its q heads use when kv < tp."""
    if kv >= tp:
        per = kv // tp
        return range(rank * per, (rank + 1) * per)
    h = rank * kv // tp
    return range(h, h + 1)


def qkv(names, shapes, ctx):
    s, r, tp, hd = ctx.shape, ctx.tp_rank, ctx.tp, ctx.shape.head_size
    q_per = s.tp_heads // tp  # padded heads (zero rows) come after the real ones
    pieces = _head_rows(names[0], shapes[0], range(r * q_per, (r + 1) * q_per), s.heads, hd)
    kv = kv_heads_for_rank(s.tp_kv_heads, tp, r)
    for name, full in zip(names[1:], shapes[1:]):
        pieces += _head_rows(name, full, kv, s.kv_heads, hd)
    return pieces


def mla_kv_b(names, shapes, ctx):
    """DeepSeek's ``kv_b_proj`` on one rank (tensorrt_llm/models/deepseek_v2/convert.py): of this
    rank's heads, every head's k_nope rows, then every head's v rows (the source holds
    [k_nope; v] per head)."""
    m, full = ctx.shape.mla, shapes[0]
    per = m.nope + m.v
    heads = _rank_heads(ctx)
    return ([_rows(names[0], full, h * per, h * per + m.nope) for h in heads]
            + [_rows(names[0], full, h * per + m.nope, (h + 1) * per) for h in heads])


def _rank_heads(ctx) -> range:
    per = ctx.shape.heads // ctx.tp
    return range(ctx.tp_rank * per, (ctx.tp_rank + 1) * per)


def mla_absorb(names, shapes, ctx):
    """The sources of DeepSeek's absorbed ``fused_q_proj`` on one rank (convert.compute computes
    it): this rank's heads of q_proj / q_b_proj, then of kv_b_proj."""
    return column(names[:2], shapes[:2], ctx)


def vocab(names, shapes, ctx):
    full = shapes[0]
    v = full[0]
    per = padded_vocab(v, ctx.tp, ctx.shape.vocab_multiple) // ctx.tp
    start = ctx.tp_rank * per
    stop = min(start + per, v)
    pieces = [_rows(names[0], full, start, stop)] if stop > start else []
    pad = per - max(0, stop - start)
    if pad:
        pieces.append(Piece(None, (), (pad, *full[1:])))
    return pieces


def whole_vocab(names, shapes, ctx):
    """The whole vocabulary on every rank (an embedding without tensor parallelism: Phi3Model's
    ``Embedding(config.vocab_size, hidden)``), zero rows up to the config's padded vocab_size."""
    full = shapes[0]
    pad = padded_vocab(full[0], 1, ctx.shape.vocab_multiple) - full[0]
    return [Piece(names[0], (), full)] + ([Piece(None, (), (pad, *full[1:]))] if pad else [])


def expert_column(names, shapes, ctx):
    """One expert's fc: each source's (w3, then w1) rows of this moe_tp rank, one after the other."""
    pieces = []
    for name, full in zip(names, shapes):
        k = full[0] // ctx.moe_tp
        pieces.append(_rows(name, full, ctx.moe_tp_rank * k, (ctx.moe_tp_rank + 1) * k))
    return pieces


def expert_row(names, shapes, ctx):
    """One expert's proj (w2): the input columns of this moe_tp rank."""
    full = shapes[0]
    k = full[1] // ctx.moe_tp
    a = ctx.moe_tp_rank * k
    return [Piece(names[0], (slice(None), slice(a, a + k)), (full[0], k))]


def pad_hidden(pieces: list[Piece], rule, shape: Shape) -> list[Piece]:
    """``pieces`` (a rank's tensor of ``rule``, a model.spec.Rule) with the hidden features padded
    to ``shape.tp_hidden`` (model.spec.RESCALED_DIMS): zero rows at the end when the tensor's
    dim 0 is hidden (dense / proj outputs, their biases, norms), zero columns when its dim 1 is
    (embedding, lm_head, the inputs of qkv / fc / gate)."""
    extra = shape.tp_hidden - shape.hidden
    dims = rule.shapes[0] if rule.shapes else ()
    if not extra or "hidden" not in dims:
        return pieces
    if dims[0] == "hidden":
        return [*pieces, Piece(None, (), (extra, *pieces[0].shape[1:]))]
    return [Piece(p.source, p.index, (p.shape[0], p.shape[1] + extra),
                  p.pad_cols + extra if p.source is not None else 0) for p in pieces]


RULES = {"replicated": replicated, "column": column, "row": row, "dense": dense, "qkv": qkv,
         "vocab": vocab, "whole_vocab": whole_vocab, "expert_column": expert_column, "expert_row": expert_row,
         "mla_kv_b": mla_kv_b, "mla_absorb": mla_absorb}


def stacked_shape(pieces: list[Piece]) -> tuple[int, ...]:
    return (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:])
