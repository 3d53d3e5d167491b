"""The chunks a rank file is written from: each planned piece (convert.shard.Piece) as a few rows at a
time, in the form that costs least to write.

A run of rows that needs no conversion (same dtype, all columns) is a ``FileSpan`` (where its bytes
are: the sink copies them file to file or ``pread``s them into its staging buffer). Rows that need a
column slice (row-parallel weights, zero columns of padded heads) or a dtype change are read with
``pread`` into one reused buffer and compacted as bytes (numpy) or converted (torch, imported only
then; exact widenings fp16/bf16 -> fp32 in numpy) into another: a ``ByteChunk``. Zero padding is a ``ByteChunk`` of zero bytes. So no chunk is
allocated per step, and a float conversion without casts never imports torch (``BYTE_COPIES``).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from common.dtypes import DType, as_dtype

CHUNK_BYTES = 16 * 2**20
# Same-dtype column slices and zero padding are moved as bytes (numpy), so a float conversion
# never imports torch; False: through torch, as dtype casts are (tests compare the two).
BYTE_COPIES = True


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


def _torch_view(buf: np.ndarray, dtype: DType, shape):
    """``buf`` (uint8) as a torch tensor of ``dtype`` and ``shape`` (same memory)."""
    import torch

    return torch.from_numpy(buf).view(dtype.torch).view(*shape)


def _widen(src: DType, dst: DType):
    """The exact widening casts (fp16/bf16 -> fp32, e.g. a Mixtral router written in float32) in
    numpy, bit for bit what torch gives: ``f(raw_rows, out_rows, c0, c1)`` on byte rows, or None."""
    if dst.st != "F32" or src.st not in ("F16", "BF16"):
        return None

    def f16(raw, out, c0, c1):
        np.copyto(out.view(np.float32)[:, :c1 - c0], raw.view(np.float16)[:, c0:c1])

    def bf16(raw, out, c0, c1):  # a bfloat16 is the top half of the float32 of the same value
        dst = out.view(np.uint32)[:, :c1 - c0]
        np.copyto(dst, raw.view(np.uint16)[:, c0:c1])
        dst <<= 16

    return f16 if src.st == "F16" else bf16


def iter_chunks(source, piece, dtype, max_bytes: int = CHUNK_BYTES, *, spans: bool = False,
                offset: float = 0.0, allow_nonfinite: bool = False, scale: float = 1.0):
    """Yield ``piece`` (a convert.shard.Piece) in ``dtype`` (a DType or torch dtype), a few rows
    at a time: torch tensors, or with ``spans=True`` (for ``write_file``) also ``FileSpan``s and
    ``ByteChunk``s, which need no torch; a yielded chunk is then only valid until the next one is
    asked for (buffers are reused). ``offset``: added in float32 before the cast (Gemma's norms,
    small tensors: through torch); ``scale``: then multiplied, in float32 (the RMSNorm weights of
    a padded hidden size, model.spec.RESCALED_DIMS).
    """
    dtype = as_dtype(dtype)
    if offset or scale != 1.0:
        for chunk in iter_chunks(source, piece, "float32", max_bytes):
            yield ((chunk.float() + offset) * scale).to(dtype.torch)
        return
    rows = piece.shape[0]
    row_elems = 1
    for d in piece.shape[1:]:
        row_elems *= d
    row_bytes = max(1, row_elems * dtype.itemsize)
    step = max(1, max_bytes // row_bytes)
    if piece.source is None:
        for a in range(0, rows, step):
            n = min(step, rows - a)
            if spans and BYTE_COPIES:
                yield ByteChunk(_zero_bytes(n * row_elems * dtype.itemsize), dtype)
            else:
                import torch

                yield torch.zeros((n, *piece.shape[1:]), dtype=dtype.torch)
        return
    first = piece.index[0] if piece.index else slice(None)
    start = first.start or 0
    rest = tuple(piece.index[1:])
    if spans and hasattr(source, "span") and hasattr(source, "read_rows_bytes"):
        fast = _fast_chunks(source, piece, dtype, start, rest, max_bytes, allow_nonfinite)
        if fast is not None:
            yield from fast
            return
    if getattr(piece, "pad_cols", 0):
        yield from _with_zero_columns(source, piece, dtype, max_bytes)
        return
    for a in range(0, rows, step):
        b = min(rows, a + step)
        yield source.read(piece.source, (slice(start + a, start + b), *rest)).to(dtype.torch)


def _with_zero_columns(source, piece, dtype, max_bytes):
    """A 2-D piece whose last ``pad_cols`` columns are zeros (padded heads): its source columns
    chunk by chunk, each followed by the zeros (small tensors: one layer's attention.dense)."""
    import dataclasses

    import torch

    rows, cols = piece.shape
    inner = dataclasses.replace(piece, shape=(rows, cols - piece.pad_cols), pad_cols=0)
    for chunk in iter_chunks(source, inner, dtype, max_bytes):
        yield torch.cat([chunk, torch.zeros((chunk.shape[0], piece.pad_cols), dtype=chunk.dtype)],
                        dim=1)


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
        # rows are read whole (contiguous in the file) into `raw`, then sliced (as bytes) or
        # converted (torch) into `out`, whose rows end in the zero columns of `pad`
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
            widen = BYTE_COPIES and _widen(src_dtype, dtype)
            if not (same and BYTE_COPIES) and not widen:
                src_view = _torch_view(raw_bytes, src_dtype, (step, *full[1:]))
                dst_view = _torch_view(out_bytes, dtype, (step, *piece.shape[1:]))
            infs = _InfCheck(src_dtype, dtype, piece.source, allow_nonfinite)
            for a in range(0, rows, step):
                n = min(step, rows - a)
                source.read_rows_bytes(piece.source, start + a, raw[:n].reshape(-1).data)
                if same and BYTE_COPIES:
                    out[:n, :kept] = raw[:n, a0:a1]
                elif widen:
                    widen(raw[:n], out[:n], c0, c1)
                elif len(full) == 2:
                    dst_view[:n, :c1 - c0].copy_(src_view[:n, c0:c1])
                else:
                    dst_view[:n].copy_(src_view[:n])
                infs.add(raw[:n, a0:a1], out[:n, :kept])
                yield ByteChunk(out[:n].reshape(-1).data, dtype)
            infs.done()

    if cols is None and same:
        return copy_spans()
    return converted()
