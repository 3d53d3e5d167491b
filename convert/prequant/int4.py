"""Each packer's int4 words -> TensorRT-LLM's groupwise int4 tensors, for a slice of one linear.

TensorRT-LLM's layout (the W4A16_AWQ checkpoint, which ``preprocess_weights`` turns into the
kernel's layout at load): ``weight`` int8 ``[out/2, in]``, two signed int4 a byte along the OUTPUT
dimension (low nibble = even row), and per group of ``g`` inputs a scale and, with zero points,
a ``zero`` added after scaling: ``w = (q - 8) * scale + zero``.

A packer's unsigned code ``q`` (0..15) becomes the signed ``q - 8``: in 4-bit two's complement
that is ``q ^ 8``, so the nibbles are moved as they are and every byte XORed with 0x88. The
moves are word-wide bit operations (no per-nibble loop): pairing two source words of adjacent
output rows (GPTQ, compressed-tensors, where a word runs along the input) or spreading the two
16-bit halves of one AWQ word (its order 0, 2, 4, 6, 1, 3, 5, 7 puts even outputs in the low half
and odd ones in the high half, i.e. already the pairs).

``slice_tensors`` returns, for output rows ``rows`` and input columns ``cols`` (group-aligned):
``packed`` uint8 ``[R/2, C]``, ``scale`` float32 ``[R, C/g]``, ``zero`` uint8 ``[R, C/g]``: the
source's zero point as an unsigned code (``w = scale * (q - zero)``), None when symmetric.
"""
from __future__ import annotations

import numpy as np

from common.errors import UserError
from convert.casts import to_float32

#: AutoAWQ's nibble order within a word: nibble i holds output 8c + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_COLUMN = np.argsort(AWQ_ORDER)  # output 8c + j is nibble _AWQ_COLUMN[j]


def unpack_words(words: np.ndarray) -> np.ndarray:
    """uint32 [..., n] -> uint8 [..., 8n]: nibble i of word k at position 8k + i."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    nib = (words[..., None] >> shifts) & np.uint32(0xF)
    return nib.reshape(*words.shape[:-1], words.shape[-1] * 8).astype(np.uint8)


def _pair_rows(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Words of two output rows running along the input (nibble i = input 8k+i), uint32 [n, K]
    -> bytes [n, 8K]: byte 8k+i = nibble i of ``lo`` | nibble i of ``hi`` << 4."""
    even = (lo & np.uint32(0x0F0F0F0F)) | ((hi & np.uint32(0x0F0F0F0F)) << np.uint32(4))
    odd = ((lo >> np.uint32(4)) & np.uint32(0x0F0F0F0F)) | (hi & np.uint32(0xF0F0F0F0))
    n, k = even.shape
    out = np.empty((n, k, 4, 2), np.uint8)  # byte j of a word: inputs 2j (even), 2j+1 (odd)
    out[..., 0] = even.view(np.uint8).reshape(n, k, 4)
    out[..., 1] = odd.view(np.uint8).reshape(n, k, 4)
    return out.reshape(n, k * 8)


def _spread(v: np.ndarray) -> np.ndarray:
    """The four nibbles of 16-bit ``v`` into the low nibbles of four bytes."""
    v = (v | (v << np.uint32(8))) & np.uint32(0x00FF00FF)
    return (v | (v << np.uint32(4))) & np.uint32(0x0F0F0F0F)


def _signed(b: np.ndarray) -> np.ndarray:
    np.bitwise_xor(b, np.uint8(0x88), out=b)
    return b


def gptq_weight(words: np.ndarray) -> np.ndarray:
    """GPTQ ``qweight`` [C/8, R] (uint32) -> TensorRT-LLM bytes [R/2, C] (the words transposed
    first, 4 bytes at a time, then paired as compressed-tensors' rows)."""
    t = np.ascontiguousarray(words.T)
    return _signed(_pair_rows(t[0::2], t[1::2]))


def awq_weight(words: np.ndarray) -> np.ndarray:
    """AWQ GEMM ``qweight`` [C, R/8] (uint32) -> TensorRT-LLM bytes [R/2, C]."""
    pairs = _spread(words & np.uint32(0xFFFF)) | (_spread(words >> np.uint32(16)) << np.uint32(4))
    b = pairs.view(np.uint8).reshape(words.shape[0], words.shape[1] * 4)
    return _signed(np.ascontiguousarray(b.T))


def ct_weight(words: np.ndarray) -> np.ndarray:
    """compressed-tensors ``weight_packed`` [R, C/8] (uint32) -> TensorRT-LLM bytes [R/2, C]."""
    return _signed(_pair_rows(words[0::2], words[1::2]))


def _check_g_idx(source, prefix: str, g: int, cols: slice) -> None:
    """A ``g_idx`` (when present) must give input i the group i // g: an act-order export that
    does not say ``desc_act`` would otherwise be read with the wrong scales."""
    name = prefix + "g_idx"
    if name not in source.meta:
        return
    got = source.read_bits(name, (cols,)).view(np.int32)
    if not np.array_equal(got, np.arange(cols.start, cols.stop, dtype=np.int32) // g):
        raise UserError(f"{name} assigns inputs to groups out of order (act-order) although the "
                        f"quantization_config does not set desc_act; TensorRT-LLM's groupwise "
                        f"kernel takes contiguous groups: convert the float model instead")


def _scale(source, name: str, index: tuple, transpose: bool) -> np.ndarray:
    s = to_float32(source.read_bits(name, index), source.dtype(name))
    return np.ascontiguousarray(s.T if transpose else s, dtype=np.float32)


def slice_tensors(source, sq, prefix: str, rows: slice, cols: slice) -> dict:
    """The TensorRT-LLM int4 tensors of ``prefix`` (an HF linear) for output ``rows`` and input
    ``cols`` (see the module docstring)."""
    g = sq.group_size
    r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
    groups = slice(c0 // g, c1 // g)
    if sq.method == "gptq":
        _check_g_idx(source, prefix, g, cols)
        packed = gptq_weight(source.read_bits(prefix + "qweight", (slice(c0 // 8, c1 // 8), rows)))
        scale = _scale(source, prefix + "scales", (groups, rows), True)
        zero = unpack_words(source.read_bits(prefix + "qzeros", (groups,)))[:, r0:r1].T
        zero = zero.astype(np.int16) + sq.zero_offset
    elif sq.method == "awq":
        packed = awq_weight(source.read_bits(prefix + "qweight", (cols, slice(r0 // 8, r1 // 8))))
        scale = _scale(source, prefix + "scales", (groups, rows), True)
        nib = unpack_words(source.read_bits(prefix + "qzeros", (groups,)))
        w = nib.reshape(nib.shape[0], -1, 8)[..., _AWQ_COLUMN].reshape(nib.shape)
        zero = w[:, r0:r1].T.astype(np.int16)
    else:
        packed = ct_weight(source.read_bits(prefix + "weight_packed", (rows, slice(c0 // 8, c1 // 8))))
        scale = _scale(source, prefix + "weight_scale", (rows, groups), False)
        zero = None
        if not sq.sym:
            words = source.read_bits(prefix + "weight_zero_point", (slice(None), groups))
            zero = unpack_words(np.ascontiguousarray(words.T)).T[r0:r1].astype(np.int16)
    return {"packed": packed, "scale": scale,
            "zero": np.ascontiguousarray(zero) if zero is not None else None}
