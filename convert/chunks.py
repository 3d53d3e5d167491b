"""The chunks a rank file is written from: each planned piece (convert.shard.Piece) as a few rows at a
time, in the form that costs least to write.

A run of rows that needs no conversion (same dtype, all columns) is a ``FileSpan`` (where its bytes
are: the sink copies them file to file or ``pread``s them into its staging buffer). Rows that need a
column slice (row-parallel weights, zero columns of padded heads) or a dtype change are read with
``pread`` into one reused buffer and compacted as bytes or cast (convert.casts: numpy, bit for bit
torch's casts) into another: a ``ByteChunk``. Zero padding is a ``ByteChunk`` of zero bytes. So no
chunk is allocated per step, and no conversion imports torch.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from common.dtypes import FLOAT32, DType, as_dtype
from common.fileio import pread_exact

from .casts import UINT, cast, cast_into, float32_into

CHUNK_BYTES = 16 * 2**20


class FileSpan:
    """``nbytes`` bytes of an open file at ``offset``, already in the planned layout and dtype."""

    __slots__ = ("fd", "offset", "nbytes", "dtype")

    def __init__(self, fd: int, offset: int, nbytes: int, dtype: DType):
        self.fd, self.offset, self.nbytes, self.dtype = fd, offset, nbytes, dtype


class ByteChunk:
    """Bytes in the planned layout and dtype (a reused buffer: valid until the next chunk)."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: memoryview, dtype: DType):
        self.data, self.dtype = data, dtype


class _BufferPool:
    """Byte buffers reused from chunk to chunk and tensor to tensor, so the conversion path
    allocates (and page-faults in) its buffers once per process instead of once per tensor:
    the process's memory stays flat whatever the model size."""

    def __init__(self):
        self._free: list[np.ndarray] = []

    @contextlib.contextmanager
    def take(self, nbytes: int):
        fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
        if fits:
            best = self._free.pop(min(fits, key=lambda i: self._free[i].size))
        else:
            best = np.empty(nbytes, dtype=np.uint8)
        try:
            yield best[:nbytes]
        finally:
            self._free.append(best)
            self._free = sorted(self._free, key=lambda b: -b.size)[:4]


_BUFFERS = _BufferPool()
_ZERO_BYTES = [memoryview(b"")]


def _zero_bytes(n: int) -> memoryview:
    if len(_ZERO_BYTES[0]) < n:
        _ZERO_BYTES[0] = memoryview(bytes(max(n, 2**20)))
    return _ZERO_BYTES[0][:n]


def iter_chunks(source, piece, dtype, max_bytes: int = CHUNK_BYTES, *, offset: float = 0.0,
                allow_nonfinite: bool = False, scale: float = 1.0):
    """Yield ``piece`` (a convert.shard.Piece) in ``dtype`` (a DType or its name), a few rows at a
    time, as ``FileSpan``s and ``ByteChunk``s (what ``convert.writer.write_file`` takes); a yielded
    chunk is only valid until the next one is asked for (buffers are reused). ``offset``: added in
    float32 before the cast (Gemma's norms, small tensors); ``scale``: then multiplied, in
    float32 (the RMSNorm weights of a padded hidden size, model.spec.RESCALED_DIMS)."""
    dtype = as_dtype(dtype)
    if offset or scale != 1.0:
        yield from _affine(source, piece, dtype, max_bytes, offset, scale)
        return
    rows = piece.shape[0]
    row_elems = math.prod(piece.shape[1:])
    step = max(1, max_bytes // max(1, row_elems * dtype.itemsize))
    if piece.source is None:
        for a in range(0, rows, step):
            n = min(step, rows - a)
            yield ByteChunk(_zero_bytes(n * row_elems * dtype.itemsize), dtype)
        return
    first = piece.index[0] if piece.index else slice(None)
    start = first.start or 0
    rest = tuple(piece.index[1:])
    fast = _fast_chunks(source, piece, dtype, start, rest, max_bytes, allow_nonfinite)
    if fast is not None:
        yield from fast
        return
    src_dtype = source.dtype(piece.source)
    pad = getattr(piece, "pad_cols", 0)
    for a in range(0, rows, step):  # any other index: numpy's indexing of the rows read
        bits = source.read_bits(piece.source, (slice(start + a, start + min(rows, a + step)), *rest))
        out = cast(bits, src_dtype, dtype)
        if pad:  # a 2-D piece whose last ``pad_cols`` columns are zeros (padded heads)
            out = np.concatenate([out, np.zeros((out.shape[0], pad), out.dtype)], axis=1)
        yield ByteChunk(memoryview(np.ascontiguousarray(out)).cast("B"), dtype)


def _affine(source, piece, dtype: DType, max_bytes: int, offset: float, scale: float):
    """``(offset + piece) * scale`` in float32 (as torch adds / multiplies a Python float to a
    float32 tensor), cast."""
    for chunk in iter_chunks(source, piece, FLOAT32, max_bytes):
        if isinstance(chunk, FileSpan):
            data = np.empty(chunk.nbytes, np.uint8)
            pread_exact(chunk.fd, memoryview(data), chunk.offset, source.meta[piece.source][0])
        else:
            data = np.frombuffer(chunk.data, np.uint8)
        x = data.view(np.float32) + np.float32(offset)
        if scale != 1.0:
            x *= np.float32(scale)
        out = np.empty(x.shape, UINT[dtype.itemsize])
        float32_into(x, dtype, out)
        yield ByteChunk(memoryview(out).cast("B"), dtype)


def _row_window(source, piece, start, rest):
    """How a piece reads whole source rows: (the source's shape, the kept columns ``(c0, c1)`` or
    None for all, elements per source row); None when its index is not (rows[, columns of a 2-D
    tensor]) or falls outside the source."""
    full = tuple(source.shape(piece.source))
    pad = getattr(piece, "pad_cols", 0)
    if not full or len(rest) > 1 or (rest and len(full) != 2) or (pad and len(full) != 2):
        return None
    if rest:
        s = rest[0]
        if not isinstance(s, slice) or s.step not in (None, 1):
            return None
        c0, c1 = s.indices(full[1])[:2]
        cols = (c0, c1) if (c0, c1) != (0, full[1]) else None
    else:
        cols = None
    kept = (c1 - c0,) if cols else tuple(full[1:])
    if tuple(piece.shape[1:]) != ((kept[0] + pad,) if pad else kept):
        return None
    if pad and cols is None:
        cols = (0, full[1])
    src_row = 1
    for d in full[1:]:
        src_row *= d
    if start < 0 or start + piece.shape[0] > full[0]:
        return None
    return full, cols, src_row


#: safetensors dtype -> (unsigned view, all bits but the sign, the bits of +Inf): a value is
#: +-Inf when its bits without the sign are exactly those
_INF_BITS = {"F16": (np.uint16, 0x7FFF, 0x7C00), "BF16": (np.uint16, 0x7FFF, 0x7F80),
             "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
             "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


class _InfCheck:
    """Counts the values a cast to float16 made infinite (finite in the source rows, Inf in the
    converted ones), on the byte rows already in memory; ``done()`` refuses them unless
    ``allow``."""

    def __init__(self, src: DType, dst: DType, name: str, allow: bool):
        self.src, self.name, self.count = src, name, 0
        self.active = not allow and dst.st == "F16" and src.st in ("F32", "BF16", "F64")

    @staticmethod
    def _infs(rows: np.ndarray, st: str) -> int:
        view, magnitude, inf = _INF_BITS[st]
        values = np.ascontiguousarray(rows).view(view)
        return int(np.count_nonzero((values & view(magnitude)) == inf))

    def add(self, src_rows: np.ndarray, out_rows: np.ndarray) -> None:
        if self.active:
            self.count += self._infs(out_rows, "F16") - self._infs(src_rows, self.src.st)

    def done(self) -> None:
        if self.count > 0:
            from common.errors import UserError

            raise UserError(f"casting tensor {self.name} from {self.src.torch_name} to float16 "
                            f"overflows: {self.count} value(s) beyond float16's range (+-65504) "
                            f"would become Inf; convert with --dtype bfloat16 or float32, or pass "
                            f"--allow-nonfinite to keep the Inf values")


def _fast_chunks(source, piece, dtype: DType, start, rest, max_bytes, allow_nonfinite=False):
    """Chunks of a piece whose index is (rows[, columns of a 2-D tensor]); None otherwise."""
    window = _row_window(source, piece, start, rest)
    if window is None:
        return None
    full, cols, src_row = window
    src_dtype = source.dtype(piece.source)
    rows = piece.shape[0]
    pad = getattr(piece, "pad_cols", 0)
    if rows == 0:
        return iter(())
    same = src_dtype == dtype

    def copy_spans():
        fd, base = source.span(piece.source)
        row_bytes = src_row * dtype.itemsize
        step = max(1, max_bytes // max(1, row_bytes))
        for a in range(0, rows, step):
            n = min(step, rows - a)
            yield FileSpan(fd, base + (start + a) * row_bytes, n * row_bytes, dtype)

    def converted():
        # rows are read whole (contiguous in the file) into `raw`, then sliced (as bytes) or cast
        # (convert.casts) into `out`, whose rows end in the zero columns of `pad`
        step = max(1, max_bytes // max(1, src_row * max(src_dtype.itemsize, dtype.itemsize)))
        step = min(step, rows)
        out_row = math.prod(piece.shape[1:])
        isz, osz = src_dtype.itemsize, dtype.itemsize
        with _BUFFERS.take(step * src_row * isz) as raw_bytes, \
                _BUFFERS.take(step * out_row * osz) as out_bytes:
            raw = raw_bytes.reshape(step, src_row * isz)
            out = out_bytes.reshape(step, out_row * osz)
            a0, a1 = (cols[0] * isz, cols[1] * isz) if cols else (0, src_row * isz)
            kept = (a1 - a0) // isz * osz  # bytes of kept columns in an output row
            if pad:
                out[:, kept:] = 0
            c0, c1 = (a0 // isz, a1 // isz)
            src_bits = raw_bytes.view(UINT[isz]).reshape(step, src_row)
            dst_bits = out_bytes.view(UINT[osz]).reshape(step, out_row)
            infs = _InfCheck(src_dtype, dtype, piece.source, allow_nonfinite)
            for a in range(0, rows, step):
                n = min(step, rows - a)
                source.read_rows_bytes(piece.source, start + a, raw[:n].reshape(-1).data)
                if same:
                    out[:n, :kept] = raw[:n, a0:a1]
                else:
                    cast_into(src_bits[:n, c0:c1], src_dtype, dtype, dst_bits[:n, :c1 - c0])
                infs.add(raw[:n, a0:a1], out[:n, :kept])
                yield ByteChunk(out[:n].reshape(-1).data, dtype)
            infs.done()

    if cols is None and same and source.stored(piece.source):
        return copy_spans()
    return converted()
