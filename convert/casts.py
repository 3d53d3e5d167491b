"""Float dtype casts on raw bits (numpy), bit for bit what torch's ``Tensor.to`` gives on CPU with
its vectorised kernels (AVX2 / AVX-512): the float path casts (``--dtype float16`` of a bfloat16
model, a float32 MoE router) without importing torch. tests/test_casts.py compares every pair with
torch, specials included.

Every floating source goes through float32, exactly as torch does: fp16, bf16 and fp8 widen
exactly; float64 rounds to float32 first (so a float64 -> float16 cast rounds twice, as in torch).
From float32: to float16 numpy's round-to-nearest-even, to bfloat16 the same rounding on the bits.
NaNs follow torch: a float16 NaN keeps its sign and top payload bits with the quiet bit set (the
F16C instruction's rule); a bfloat16 NaN is 0xFFFF from float32, 0x7FC0 from float16 (torch's
vectorised float32 kernel and its scalar float16 one; with ``ATEN_CPU_CAPABILITY=default`` torch
writes 0x7FC0 from float32 too).
"""
from __future__ import annotations

import math

import numpy as np

from common.dtypes import FLOAT32, DType
from common.errors import UserError

#: unsigned integer of each item size: how raw bits are held
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
#: torch's bfloat16 NaN by source (its scalar kernels' 0x7FC0); 0xFFFF from float32 and float64
_BF16_NAN = {"F16": 0x7FC0, "F8_E4M3": 0x7FC0, "F8_E5M2": 0x7FC0}


def _e4m3_table() -> np.ndarray:
    """float8_e4m3fn code -> float32 (exact): bias 7, subnormals, no Inf, S.1111.111 is NaN."""
    code = np.arange(256)
    e, m = (code >> 3) & 15, (code & 7).astype(np.float64)
    value = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))
    value = np.where(code >> 7, -value, value).astype(np.float32)
    nan = (code & 0x7F) == 0x7F
    value.view(np.uint32)[nan] = np.where(code[nan] >> 7, 0xFFF00000, 0x7FF00000)  # torch's NaNs
    return value


_E4M3 = _e4m3_table()


def _refuse(src: DType, dst: DType):
    return UserError(f"cannot cast {src.st} tensors to {dst.st}: the float path casts floating-point "
                     f"weights only; convert a model whose config.json declares its float dtype")


def _quiet(x: np.ndarray) -> np.ndarray:
    """``x`` with its NaNs quiet, as torch widens float16 (numpy keeps a signalling NaN's bits)."""
    isnan = np.isnan(x)
    if isnan.any():
        x.view(np.uint32)[isnan] |= 0x00400000
    return x


def to_float32(bits: np.ndarray, src: DType) -> np.ndarray:
    """``bits`` (``UINT[src.itemsize]``) as float32 values (exact but for float64's rounding)."""
    st = src.st
    if st == "F32":
        return bits.view(np.float32)
    if st == "F16":
        return _quiet(bits.view(np.float16).astype(np.float32))
    if st == "BF16":  # a bfloat16 is the top half of the float32 of the same value
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if st == "F64":
        with np.errstate(over="ignore", invalid="ignore"):
            return bits.view(np.float64).astype(np.float32)
    if st == "F8_E5M2":  # the top byte of the float16 of the same value
        return _quiet((bits.astype(np.uint16) << 8).view(np.float16).astype(np.float32))
    if st == "F8_E4M3":
        return _E4M3[bits]
    raise _refuse(src, src)


def _to_bfloat16(x: np.ndarray, out: np.ndarray, nan: int) -> None:
    u = x.view(np.uint32)
    r = (u >> 16) & 1  # round to nearest even on the bits: + 0x7FFF + the kept lowest bit
    r += 0x7FFF
    r += u
    r >>= 16
    np.copyto(out, r, casting="unsafe")
    isnan = np.isnan(x)
    if isnan.any():
        out[isnan] = nan


def _to_float16(x: np.ndarray, out: np.ndarray) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(out.view(np.float16), x, casting="unsafe")
    isnan = np.isnan(x)
    if isnan.any():  # F16C's NaN: the sign, quiet, the top 9 payload bits (numpy's differ)
        u = x.view(np.uint32)[isnan]
        out[isnan] = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)


def _arithmetic(bits: np.ndarray, src: DType, dst: DType, out: np.ndarray) -> None:
    if dst.st == "F32":
        np.copyto(out.view(np.float32), to_float32(bits, src))
    elif dst.st == "F16":
        _to_float16(to_float32(bits, src), out)
    else:
        _to_bfloat16(to_float32(bits, src), out, _BF16_NAN.get(src.st, 0xFFFF))


_TABLES: dict[tuple[str, str], np.ndarray] = {}


def _table(src: DType, dst: DType) -> np.ndarray:
    """Every code of a 1- or 2-byte ``src`` cast to ``dst``: one lookup per element is 3-4x faster
    than numpy's arithmetic path (about torch's speed, BENCHMARKS.md)."""
    key = (src.st, dst.st)
    if key not in _TABLES:
        codes = np.arange(256 ** src.itemsize, dtype=UINT[src.itemsize])
        table = np.empty(codes.shape, UINT[dst.itemsize])
        _arithmetic(codes, src, dst, table)
        _TABLES[key] = table
    return _TABLES[key]


#: elements cast per step: the temporaries of a step stay in the CPU's L2 cache (2x faster casts
#: of 16 MB chunks than whole-chunk steps)
_STEP = 1 << 16


def cast_into(bits: np.ndarray, src: DType, dst: DType, out: np.ndarray) -> None:
    """Cast ``bits`` (``UINT[src.itemsize]``, any shape) into ``out`` (``UINT[dst.itemsize]``,
    the same shape)."""
    if src == dst:
        np.copyto(out, bits)
        return
    if src.st not in FLOATS or dst.st not in ("F32", "F16", "BF16"):
        raise _refuse(src, dst)
    step = max(1, _STEP // max(1, math.prod(bits.shape[1:])))
    for a in range(0, bits.shape[0] if bits.ndim else 1, step):
        b, o = (bits[a:a + step], out[a:a + step]) if bits.ndim else (bits, out)
        if src.itemsize <= 2:
            np.take(_table(src, dst), b, out=o, mode="clip")  # every code is in the table
        else:
            _arithmetic(b, src, dst, o)


def cast(bits: np.ndarray, src: DType, dst: DType) -> np.ndarray:
    """``bits`` cast to ``dst`` (a new ``UINT[dst.itemsize]`` array of the same shape)."""
    out = np.empty(bits.shape, UINT[dst.itemsize])
    cast_into(bits, src, dst, out)
    return out


def float32_into(x: np.ndarray, dst: DType, out: np.ndarray) -> None:
    """float32 values ``x`` rounded into ``out`` (``UINT[dst.itemsize]``), as ``cast_into``."""
    cast_into(x.view(np.uint32), FLOAT32, dst, out)
