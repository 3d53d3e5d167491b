"""A streaming safetensors writer.

The safetensors layout is ``u64 header length | JSON header | raw tensor bytes``; offsets in the
header depend only on shapes and dtypes, so the header is written first and each tensor's bytes
are streamed after it in row chunks. A file is never held in memory, and the same plan always
gives the same bytes.

Hot path (``iter_chunks(..., spans=True)`` into ``write_file``): a run of rows that needs no
conversion (same dtype, all columns) is a ``FileSpan`` copied file to file by the kernel
(``copy_file_range``, as ``cp`` does; a plain pread/write loop where the kernel refuses); rows
that need a column slice (row-parallel weights) or a dtype change are read with ``pread`` into one
reused buffer and converted/compacted into another, so no chunk is allocated per step.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
from pathlib import Path

import torch

ST_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CHUNK_BYTES = 32 * 2**20


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def header_bytes(tensors) -> bytes:
    """The header for ``tensors`` (objects with name, shape, dtype), in their order."""
    header, offset = {}, 0
    for t in tensors:
        size = nbytes(t.shape, t.dtype)
        header[t.name] = {"dtype": ST_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself pads
    return struct.pack("<Q", len(raw)) + raw


class FileSpan:
    """``nbytes`` bytes of an open file at ``offset``, already in the planned layout and dtype."""

    __slots__ = ("fd", "offset", "nbytes", "dtype")

    def __init__(self, fd: int, offset: int, nbytes: int, dtype: torch.dtype):
        self.fd, self.offset, self.nbytes, self.dtype = fd, offset, nbytes, dtype


_ZEROS: dict[torch.dtype, torch.Tensor] = {}


class _BufferPool:
    """Byte buffers reused from chunk to chunk and tensor to tensor, so the conversion path
    allocates (and page-faults in) its buffers once per process instead of once per tensor:
    the process's memory stays flat whatever the model size."""

    def __init__(self):
        self._free: list[torch.Tensor] = []

    @contextlib.contextmanager
    def take(self, nbytes: int):
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fits:
            best = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            best = torch.empty(nbytes, dtype=torch.uint8)
        try:
            yield best[:nbytes]
        finally:
            self._free.append(best)
            self._free = sorted(self._free, key=lambda b: -b.numel())[:4]


_BUFFERS = _BufferPool()


def _zeros(n_elems: int, dtype: torch.dtype) -> torch.Tensor:
    z = _ZEROS.get(dtype)
    if z is None or z.numel() < n_elems:
        z = _ZEROS[dtype] = torch.zeros(max(n_elems, 2**20), dtype=dtype)
    return z[:n_elems]


def iter_chunks(source, piece, dtype: torch.dtype, max_bytes: int = CHUNK_BYTES, *,
                spans: bool = False):
    """Yield ``piece`` (a convert.shard.Piece) as tensors of ``dtype``, a few rows at a time.

    With ``spans=True`` (for ``write_file``), chunks may also be ``FileSpan``s, and a yielded
    tensor is only valid until the next one is asked for (buffers are reused).
    """
    rows = piece.shape[0]
    row_elems = 1
    for d in piece.shape[1:]:
        row_elems *= d
    row_bytes = max(1, row_elems * dtype.itemsize)
    step = max(1, max_bytes // row_bytes)
    if piece.source is None:
        for a in range(0, rows, step):
            n = min(step, rows - a)
            if spans:
                yield _zeros(n * row_elems, dtype).view(n, *piece.shape[1:])
            else:
                yield torch.zeros((n, *piece.shape[1:]), dtype=dtype)
        return
    first = piece.index[0] if piece.index else slice(None)
    start = first.start or 0
    rest = tuple(piece.index[1:])
    if spans and hasattr(source, "span") and hasattr(source, "read_rows_into"):
        fast = _fast_chunks(source, piece, dtype, start, rest, max_bytes)
        if fast is not None:
            yield from fast
            return
    for a in range(0, rows, step):
        b = min(rows, a + step)
        yield source.read(piece.source, (slice(start + a, start + b), *rest)).to(dtype)


def _fast_chunks(source, piece, dtype, start, rest, max_bytes):
    """Chunks of a piece whose index is (rows[, columns of a 2-D tensor]); None otherwise."""
    full = tuple(source.shape(piece.source))
    src_dtype = source.dtype(piece.source)
    rows = piece.shape[0]
    if not full or len(rest) > 1 or (rest and len(full) != 2):
        return None
    if rest:
        s = rest[0]
        if not isinstance(s, slice) or s.step not in (None, 1):
            return None
        c0, c1 = s.indices(full[1])[:2]
        cols = (c0, c1) if (c0, c1) != (0, full[1]) else None
    else:
        cols = None
    if tuple(piece.shape[1:]) != ((c1 - c0,) if cols else tuple(full[1:])):
        return None
    src_row = 1
    for d in full[1:]:
        src_row *= d
    if start < 0 or start + rows > full[0]:
        return None

    def copy_spans():
        fd, base = source.span(piece.source)
        row_bytes = src_row * dtype.itemsize
        step = max(1, max_bytes // max(1, row_bytes))
        for a in range(0, rows, step):
            n = min(step, rows - a)
            yield FileSpan(fd, base + (start + a) * row_bytes, n * row_bytes, dtype)

    def converted():
        # rows are read whole (contiguous in the file) into `raw`, then sliced/converted into `out`
        step = max(1, max_bytes // max(1, src_row * max(src_dtype.itemsize, dtype.itemsize)))
        step = min(step, rows)
        out_row = 1
        for d in piece.shape[1:]:
            out_row *= d
        with _BUFFERS.take(step * src_row * src_dtype.itemsize) as raw_bytes, \
                _BUFFERS.take(step * out_row * dtype.itemsize) as out_bytes:
            raw = raw_bytes.view(src_dtype).view(step, *full[1:])
            out = out_bytes.view(dtype).view(step, *piece.shape[1:])
            for a in range(0, rows, step):
                n = min(step, rows - a)
                source.read_rows_into(piece.source, start + a, raw[:n])
                view = raw[:n, cols[0]:cols[1]] if cols else raw[:n]
                out[:n].copy_(view)
                yield out[:n]

    if cols is None and src_dtype == dtype:
        return copy_spans()
    return converted()


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


_COPY_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF,
                     errno.EPERM}
_kernel_copy = [hasattr(os, "copy_file_range")]


def _copy_span(span: FileSpan, dst: int) -> None:
    """Append ``span`` to ``dst`` (at its current position): in the kernel where possible."""
    done = 0
    if _kernel_copy[0]:
        try:
            while done < span.nbytes:
                got = os.copy_file_range(span.fd, dst, span.nbytes - done, span.offset + done)
                if got == 0:
                    raise OSError(errno.EIO, f"source ends early at byte {span.offset + done}")
                done += got
            return
        except OSError as e:
            if e.errno not in _COPY_UNSUPPORTED or done:
                raise
            _kernel_copy[0] = False  # e.g. across file systems: use pread/write from now on
    buf = bytearray(min(span.nbytes, 8 * 2**20))
    view = memoryview(buf)
    while done < span.nbytes:
        n = min(len(buf), span.nbytes - done)
        got = os.preadv(span.fd, [view[:n]], span.offset + done)
        if got <= 0:
            raise OSError(errno.EIO, f"source ends early at byte {span.offset + done}")
        _write_all(dst, view[:got])
        done += got


def write_file(path: Path, tensors, produce, on_bytes=None) -> None:
    """Write ``tensors`` (with name/shape/dtype) to ``path``; ``produce(t)`` yields t's chunks
    (tensors, or ``FileSpan``s copied as they are).

    ``on_bytes(n)`` is called as data is written (progress). Each chunk's size is checked, so a
    wrong plan cannot produce a file whose header lies. The file is fsynced before returning.
    """
    with open(path, "wb", buffering=0) as f:
        fd = f.fileno()
        _write_all(fd, memoryview(header_bytes(tensors)))
        for t in tensors:
            want = nbytes(t.shape, t.dtype)
            done = 0
            for chunk in produce(t):
                if chunk.dtype != t.dtype:
                    raise AssertionError(f"{t.name}: produced {chunk.dtype}, planned {t.dtype}")
                if isinstance(chunk, FileSpan):
                    _copy_span(chunk, fd)
                    n = chunk.nbytes
                else:
                    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                    _write_all(fd, memoryview(data))
                    n = data.nbytes
                done += n
                if on_bytes:
                    on_bytes(n)
            if done != want:
                raise AssertionError(f"{t.name}: wrote {done} bytes, planned {want}")
        os.fsync(fd)
