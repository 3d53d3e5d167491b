"""A streaming safetensors writer.

The safetensors layout is ``u64 header length | JSON header | raw tensor bytes``; offsets in the
header depend only on shapes and dtypes, so the header is written first and each tensor's bytes
are streamed after it in row chunks. A file is never held in memory, and the same plan always
gives the same bytes.

Hot path (``iter_chunks(..., spans=True)`` into ``write_file``): a run of rows that needs no
conversion (same dtype, all columns) is a ``FileSpan``; rows that need a column slice
(row-parallel weights) or a dtype change are read with ``pread`` into one reused buffer and
converted/compacted into another, so no chunk is allocated per step. Big files are written with
``O_DIRECT`` (spans are ``pread`` into aligned staging buffers that a thread writes out), which on
the VM measured in BENCHMARKS.md is 2-4x faster than going through the page cache; smaller ones
through the page cache, spans copied file to file by the kernel (``copy_file_range``, as ``cp``
does). See ``_direct_io_wanted``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path

import torch

ST_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CHUNK_BYTES = 16 * 2**20
# Direct I/O: "auto" (files of DIRECT_MIN_BYTES and DIRECT_MEM_FRACTION of the available memory
# or more, see _direct_io_wanted), "1" (every file), "0" (never); the environment variable
# BUILD_ENGINE_DIRECT_IO overrides it.
DIRECT_IO = "auto"
DIRECT_MIN_BYTES = 64 * 2**20
DIRECT_MEM_FRACTION = 1 / 4
DIRECT_BUFFER = 8 * 2**20
DIRECT_ALIGN = 4096


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
    if getattr(piece, "pad_cols", 0):
        yield from _with_zero_columns(source, piece, dtype, max_bytes)
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


def _with_zero_columns(source, piece, dtype, max_bytes):
    """A 2-D piece whose last ``pad_cols`` columns are zeros (padded heads): its source columns
    chunk by chunk, each followed by the zeros (small tensors: one layer's attention.dense)."""
    import dataclasses

    rows, cols = piece.shape
    inner = dataclasses.replace(piece, shape=(rows, cols - piece.pad_cols), pad_cols=0)
    for chunk in iter_chunks(source, inner, dtype, max_bytes):
        yield torch.cat([chunk, torch.zeros((chunk.shape[0], piece.pad_cols), dtype=dtype)], dim=1)


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
    if rows == 0:
        return iter(())

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


class _BufferedSink:
    """Appends to ``fd`` through the page cache: ``os.write`` and in-kernel ``copy_file_range``."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: memoryview) -> None:
        _write_all(self.fd, data)

    def copy(self, span: FileSpan) -> None:
        _copy_span(span, self.fd)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _DirectSink:
    """Appends to an ``O_DIRECT`` fd through aligned staging buffers that a thread writes out.

    Source spans are ``pread`` straight into the staging buffer (one copy out of the page cache)
    and go to the disk by DMA: no page-cache copy, allocation or writeback of the output, which on
    a VM costs more CPU than the disk takes to write it (see BENCHMARKS.md). The main thread fills
    one buffer while the thread writes the previous one. The tail is padded to the alignment and
    the file truncated to its real length on close.
    """

    def __init__(self, fd: int, buf_bytes: int | None = None, nbufs: int = 3):
        buf_bytes = buf_bytes or DIRECT_BUFFER
        self.fd, self.size, self.length = fd, buf_bytes, 0
        self._bufs = [mmap.mmap(-1, buf_bytes) for _ in range(nbufs)]  # page-aligned
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        for b in self._bufs[1:]:
            self._free.put(b)
        self._cur, self._view, self._pos = self._bufs[0], memoryview(self._bufs[0]), 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="direct-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buf, n = item
            try:
                if self._error is None:
                    self._write(memoryview(buf)[:n])
            except BaseException as e:  # surfaced in the main thread at its next call
                self._error = e
            finally:
                self._free.put(buf)

    def _write(self, data: memoryview) -> None:
        try:
            _write_all(self.fd, data)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # the file system took O_DIRECT at open but refuses it on write: go buffered
            fcntl.fcntl(self.fd, fcntl.F_SETFL,
                        fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(self.fd, data)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, n: int) -> None:
        self._check()
        self._full.put((self._cur, n))
        self._cur = self._free.get()
        self._view, self._pos = memoryview(self._cur), 0

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(data):
            k = min(len(data), self.size - self._pos)
            self._view[self._pos:self._pos + k] = data[:k]
            self._pos += k
            self.length += k
            data = data[k:]
            if self._pos == self.size:
                self._submit(self.size)

    def copy(self, span: FileSpan) -> None:
        from .source import pread_exact

        done = 0
        while done < span.nbytes:
            k = min(span.nbytes - done, self.size - self._pos)
            try:
                pread_exact(span.fd, self._view[self._pos:self._pos + k], span.offset + done)
            except Exception as e:
                raise OSError(errno.EIO, str(e)) from e
            self._pos += k
            self.length += k
            done += k
            if self._pos == self.size:
                self._submit(self.size)

    def close(self) -> None:
        if self._pos:
            padded = -(-self._pos // DIRECT_ALIGN) * DIRECT_ALIGN
            self._view[self._pos:padded] = bytes(padded - self._pos)
            self._submit(padded)
        self._full.put(None)
        self._thread.join()
        self._release()
        self._check()
        os.ftruncate(self.fd, self.length)

    def abort(self) -> None:
        self._full.put(None)
        self._thread.join()
        self._release()

    def _release(self) -> None:
        self._view.release()
        for b in self._bufs:
            try:
                b.close()
            except BufferError:
                pass


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _direct_io_wanted(planned: int) -> bool:
    """auto: O_DIRECT for files of at least DIRECT_MIN_BYTES and 1/4 of the available memory.

    A smaller file is better left in the page cache: the next reader (build.json's sha256 of
    the outputs, the engine build) finds it there, and re-reading it from disk costs more than
    the page-cache copy saves. A bigger one would evict the source shards (and itself) anyway.
    """
    mode = os.environ.get("BUILD_ENGINE_DIRECT_IO", DIRECT_IO).lower()
    if mode in ("0", "off", "no", "false") or not hasattr(os, "O_DIRECT"):
        return False
    if mode in ("1", "on", "yes", "true"):
        return True
    return planned >= DIRECT_MIN_BYTES and planned >= _available_memory() * DIRECT_MEM_FRACTION


def _open_sink(path: Path, planned: int):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if _direct_io_wanted(planned):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o666)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # e.g. tmpfs: no O_DIRECT
                raise
        else:
            try:
                return fd, _DirectSink(fd)
            except BaseException:
                os.close(fd)
                raise
    fd = os.open(path, flags, 0o666)
    return fd, _BufferedSink(fd)


def write_file(path: Path, tensors, produce, on_bytes=None) -> None:
    """Write ``tensors`` (with name/shape/dtype) to ``path``; ``produce(t)`` yields t's chunks
    (tensors, or ``FileSpan``s copied as they are).

    ``on_bytes(n)`` is called as data is written (progress). Each chunk's size is checked, so a
    wrong plan cannot produce a file whose header lies. The file is fsynced before returning.
    """
    header = header_bytes(tensors)
    planned = len(header) + sum(nbytes(t.shape, t.dtype) for t in tensors)
    fd, sink = _open_sink(Path(path), planned)
    try:
        sink.write(memoryview(header))
        for t in tensors:
            want = nbytes(t.shape, t.dtype)
            done = 0
            for chunk in produce(t):
                if chunk.dtype != t.dtype:
                    raise AssertionError(f"{t.name}: produced {chunk.dtype}, planned {t.dtype}")
                if isinstance(chunk, FileSpan):
                    sink.copy(chunk)
                    n = chunk.nbytes
                else:
                    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                    sink.write(memoryview(data))
                    n = data.nbytes
                done += n
                if on_bytes:
                    on_bytes(n)
            if done != want:
                raise AssertionError(f"{t.name}: wrote {done} bytes, planned {want}")
        sink.close()
        os.fsync(fd)
    except BaseException:
        sink.abort()
        raise
    finally:
        os.close(fd)
