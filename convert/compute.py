"""Computed tensors: a rank tensor that is a function of several source slices, not a copy of
them (``model.spec.Rule`` with a shard rule named in ``COMPUTED``). The plan lists the slices it
reads as its pieces (so the plan's checks and the resume fingerprint see them) and the writer asks
:func:`computed_chunks` for its bytes, computed here in float32 with numpy (no torch), a bounded
block of output rows at a time, then cast to the checkpoint dtype.

DeepSeek-V2's absorbed ``attention.fused_q_proj`` (tensorrt_llm/models/deepseek_v2/convert.py,
``convert_layer``): for each head h of the rank, with q = q_proj / q_b_proj's head rows split into
``q_nope [nope, q_in]`` and ``q_pe [rope, q_in]`` and kv_b_proj's head rows into ``k_nope [nope,
kv_lora]`` and v, the head's rows are ``[k_nope^T @ q_nope ; q_pe]`` ([kv_lora + rope, q_in]; the
converter's ``einsum('hdq,hdk->hkq')`` then ``cat`` along dim 1). TensorRT-LLM's converter
computes it in the checkpoint dtype; this computes it in float32 from the source values and casts
once, so the only rounding is the final cast.
"""
from __future__ import annotations

import numpy as np

from common.dtypes import FLOAT32, DType

from .casts import UINT, cast, float32_into
from .chunks import ByteChunk


def _rows_f32(source, piece, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``piece`` (rows of one source tensor) as float32."""
    first = piece.index[0] if piece.index else slice(0, piece.shape[0])
    start = first.start or 0
    bits = source.read_bits(piece.source, (slice(start + r0, start + r1), *piece.index[1:]))
    return cast(bits, source.dtype(piece.source), FLOAT32).view(np.float32)


def absorbed_q(q: np.ndarray, kv: np.ndarray, nope: int) -> np.ndarray:
    """One head's fused_q_proj rows [kv_lora + rope, q_in] from its q rows [nope + rope, q_in]
    and its kv_b_proj rows [nope + v, kv_lora], in float32."""
    absorbed = kv[:nope].T @ q[:nope]
    return np.concatenate([absorbed, q[nope:]], axis=0)


def mla_absorb_shape(shape, tp: int) -> tuple[int, int]:
    """The rank's fused_q_proj shape: [heads/tp x (kv_lora + rope), q_in]."""
    m = shape.mla
    q_in = m.q_lora or shape.hidden
    return (shape.heads // tp * (m.kv_lora + m.rope), q_in)


def _mla_absorb_chunks(source, t, dtype: DType):
    nope, rope, v = t.compute[1]
    q_piece, kv_piece = t.pieces
    for h in range(q_piece.shape[0] // (nope + rope)):  # one head at a time
        q = _rows_f32(source, q_piece, h * (nope + rope), (h + 1) * (nope + rope))
        kv = _rows_f32(source, kv_piece, h * (nope + v), (h + 1) * (nope + v))
        rows = absorbed_q(q, kv, nope)
        out = np.empty(rows.shape, UINT[dtype.itemsize])
        float32_into(np.ascontiguousarray(rows), dtype, out)
        yield ByteChunk(memoryview(out).cast("B"), dtype)


#: shard rule -> (the OutputTensor's shape from (shape, tp), its ``compute`` args from the shape,
#: the chunk generator)
COMPUTED = {
    "mla_absorb": (mla_absorb_shape, lambda s: (s.mla.nope, s.mla.rope, s.mla.v),
                   _mla_absorb_chunks),
}


def computed_chunks(source, t):
    """The bytes of the computed tensor ``t`` (an OutputTensor with ``compute`` set), in order."""
    yield from COMPUTED[t.compute[0]][2](source, t, t.dtype)
