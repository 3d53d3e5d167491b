"""A streaming safetensors writer.

The safetensors layout is ``u64 header length | JSON header | raw tensor bytes``; offsets in the
header depend only on shapes and dtypes, so the header is written first and each tensor's bytes
are streamed after it in row chunks. A file is never held in memory, and the same plan always
gives the same bytes.

Hot path (``iter_chunks(..., spans=True)`` into ``write_file``): chunks are ``FileSpan``s (bytes
of a source file, already in the output's layout) and ``ByteChunk``s (compacted or converted rows,
zero padding), see convert.chunks; torch tensors are taken too. Files are written with
``O_DIRECT`` (spans are ``pread`` into aligned staging buffers that a thread writes out), which on
the VM measured in BENCHMARKS.md is 2-4x faster than going through the page cache. Every staging
buffer is also fed to a BLAKE3 hash on another thread, and the digest is recorded
(convert.digests) for build.json, which therefore never reads an output back. Where the file
system refuses ``O_DIRECT`` (tmpfs) or ``BUILD_ENGINE_DIRECT_IO=0``, files go through the page
cache, spans copied file to file by the kernel (``copy_file_range``, as ``cp`` does; build.json
then hashes them).

``write_file(..., then=...)`` returns before its fsync: the fsync, and then ``then`` (the rename
that marks the file complete), run on a thread while the caller writes the next file;
``wait_durable()`` waits for them.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path

import blake3
import numpy as np

from . import digests
from .chunks import CHUNK_BYTES, ByteChunk, FileSpan, iter_chunks  # noqa: F401 (re-exported)
from .dtypes import as_dtype

# Direct I/O: "auto" and "1" (every file, where the file system takes it), "0" (never); the
# environment variable BUILD_ENGINE_DIRECT_IO overrides it.
DIRECT_IO = "auto"
# 32 MiB: one O_DIRECT write of 32 MiB reaches this VM's disk 0.5-0.9 s sooner per 3.76 GB than
# 8 MiB writes (BENCHMARKS.md, issue 15); 4 buffers, 128 MiB of RSS
DIRECT_BUFFER = 32 * 2**20
DIRECT_ALIGN = 4096
# two writes in flight: a writer thread waits for the GIL after each write while the main thread
# copies bytes under it, and the disk idles meanwhile unless the other writer's write is queued
DIRECT_WRITERS = 2


def nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def header_bytes(tensors) -> bytes:
    """The header for ``tensors`` (objects with name, shape, dtype), in their order."""
    header, offset = {}, 0
    for t in tensors:
        size = nbytes(t.shape, t.dtype)
        header[t.name] = {"dtype": as_dtype(t.dtype).st, "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself pads
    return struct.pack("<Q", len(raw)) + raw


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


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
    """Appends to ``fd`` through the page cache: ``os.write`` and in-kernel ``copy_file_range``.
    Its BLAKE3 digest is known only when no span went through the kernel (``digest()`` None
    otherwise)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._hash = blake3.blake3()

    def write(self, data: memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        _write_all(self.fd, data)

    def copy(self, span: FileSpan) -> None:
        self._hash = None  # those bytes never reach user space: build.json reads the file
        _copy_span(span, self.fd)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def digest(self) -> str | None:
        return self._hash.hexdigest() if self._hash is not None else None


class _DirectSink:
    """Appends to an ``O_DIRECT`` fd through aligned staging buffers, hashed by one thread and
    written out by another, side by side.

    Source spans are ``pread`` straight into the staging buffer (one copy out of the page cache)
    and go to the disk by DMA: no page-cache copy, allocation or writeback of the output, which on
    a VM costs more CPU than the disk takes to write it (see BENCHMARKS.md). The main thread fills
    one buffer while the hash thread updates the file's BLAKE3 hash (in order) and the writer
    threads ``pwrite`` the ones filled before at their offsets, neither waiting for the other (a
    buffer is reused once both are done with it; blake3's update and pwrite release the GIL), so
    the hash is never between a buffer and the disk. Two writes are in flight so that the disk is
    not idle while a writer waits for the GIL after its write. BLAKE3, not sha256: one core
    hashes ~5 GB/s here against sha256's ~1.6, so the hash thread needs about a third of a core at
    the disk's pace. The tail is padded to the alignment and the file truncated to its real length
    on close.
    """

    def __init__(self, fd: int, buf_bytes: int | None = None, nbufs: int = 4,
                 nwriters: int | None = None):
        buf_bytes = buf_bytes or DIRECT_BUFFER
        self.fd, self.size, self.length, self._offset = fd, buf_bytes, 0, 0
        self._bufs = [mmap.mmap(-1, buf_bytes) for _ in range(nbufs)]  # page-aligned
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        self._users: dict[int, int] = {}  # id(buffer) -> threads still using it (hash, write)
        self._lock = threading.Lock()
        for b in self._bufs[1:]:
            self._free.put(b)
        self._cur, self._view, self._pos = self._bufs[0], memoryview(self._bufs[0]), 0
        self._hash = blake3.blake3()
        self._error: BaseException | None = None
        self._nwriters = nwriters or DIRECT_WRITERS
        self._threads = [threading.Thread(target=self._run_hash, name="direct-hash", daemon=True)]
        self._threads += [threading.Thread(target=self._run, name="direct-writer", daemon=True)
                          for _ in range(self._nwriters)]
        for t in self._threads:
            t.start()

    def _release(self, buf) -> None:
        with self._lock:
            left = self._users[id(buf)] = self._users[id(buf)] - 1
        if not left:
            self._free.put(buf)

    def _run_hash(self) -> None:
        while True:
            item = self._to_hash.get()
            if item is None:
                return
            buf, real = item
            try:
                with memoryview(buf) as view:
                    self._hash.update(view[:real])  # the padding of the tail is not the file's
            finally:
                self._release(buf)

    def _run(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buf, n, offset = item
            try:
                if self._error is None:
                    with memoryview(buf) as view:
                        self._write(view[:n], offset)
            except BaseException as e:  # surfaced in the main thread at its next call
                self._error = e
            finally:
                self._release(buf)

    def _write(self, data: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # the file system took O_DIRECT at open but refuses it on write: go buffered
            with self._lock:
                fcntl.fcntl(self.fd, fcntl.F_SETFL,
                            fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _pwrite_all(self.fd, data, offset)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, n: int, real: int | None = None) -> None:
        self._check()
        with self._lock:
            self._users[id(self._cur)] = 2
        self._to_hash.put((self._cur, n if real is None else real))
        self._full.put((self._cur, n, self._offset))
        self._offset += n
        self._cur = self._free.get()
        self._view, self._pos = memoryview(self._cur), 0

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(data):
            k = min(len(data), self.size - self._pos)
            # numpy's copy lets go of the GIL (a memoryview slice assignment holds it), so the
            # writer threads are not kept from issuing their next write meanwhile
            np.copyto(np.frombuffer(self._view[self._pos:self._pos + k], np.uint8),
                      np.frombuffer(data[:k], np.uint8))
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
            self._submit(padded, self._pos)
        self._stop()
        self._check()
        os.ftruncate(self.fd, self.length)

    def abort(self) -> None:
        self._stop()

    def digest(self) -> str:
        return self._hash.hexdigest()

    def _stop(self) -> None:
        self._to_hash.put(None)
        for _ in range(self._nwriters):
            self._full.put(None)
        for t in self._threads:
            t.join()
        self._view.release()
        for b in self._bufs:
            try:
                b.close()
            except BufferError:
                pass


def _direct_io_wanted() -> bool:
    """O_DIRECT unless BUILD_ENGINE_DIRECT_IO says no. Every size: the outputs are hashed while
    written (no read-back for build.json), and the page-cache copy of the output costs more CPU on
    a VM than the disk takes to write it (BENCHMARKS.md)."""
    mode = os.environ.get("BUILD_ENGINE_DIRECT_IO", DIRECT_IO).lower()
    return mode not in ("0", "off", "no", "false") and hasattr(os, "O_DIRECT")


def _open_sink(path: Path):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if _direct_io_wanted():
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


_durable: list[cf.Future] = []
_durable_pool: list[cf.ThreadPoolExecutor] = []


def _finish(fd: int, digest: str | None, then) -> None:
    """fsync, record the digest (the file's final size and mtime are its key), close, then."""
    try:
        os.fsync(fd)
        if digest is not None:
            digests.record(fd, digest)
    finally:
        os.close(fd)
    if then is not None:
        then()


def wait_durable(raise_errors: bool = True) -> None:
    """Wait for the fsyncs (and their ``then``) that ``write_file(..., then=...)`` left running;
    raise the first one's error."""
    pending, _durable[:] = list(_durable), []
    first = None
    for fut in pending:
        try:
            fut.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            first = first or e
    if first is not None and raise_errors:
        raise first


def write_file(path: Path, tensors, produce, on_bytes=None, then=None) -> None:
    """Write ``tensors`` (with name/shape/dtype, a DType or torch dtype) to ``path``;
    ``produce(t)`` yields t's chunks (torch tensors, or ``FileSpan``s / ``ByteChunk``s written as
    they are).

    ``on_bytes(n)`` is called as data is written (progress). Each chunk's size is checked, so a
    wrong plan cannot produce a file whose header lies. The file is fsynced before returning; with
    ``then`` (e.g. the rename that marks the file complete), the fsync and then ``then()`` run on
    a thread and this returns at once (``wait_durable()`` waits for them, in order).
    """
    header = header_bytes(tensors)
    fd, sink = _open_sink(Path(path))
    try:
        sink.write(memoryview(header))
        for t in tensors:
            want = nbytes(t.shape, t.dtype)
            planned = as_dtype(t.dtype)
            done = 0
            for chunk in produce(t):
                if as_dtype(chunk.dtype) != planned:
                    raise AssertionError(f"{t.name}: produced {chunk.dtype}, planned {t.dtype}")
                if isinstance(chunk, FileSpan):
                    sink.copy(chunk)
                    n = chunk.nbytes
                elif isinstance(chunk, ByteChunk):
                    sink.write(chunk.data)
                    n = len(chunk.data)
                else:  # a torch tensor (so torch is imported already)
                    import torch

                    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                    sink.write(memoryview(data))
                    n = data.nbytes
                done += n
                if on_bytes:
                    on_bytes(n)
            if done != want:
                raise AssertionError(f"{t.name}: wrote {done} bytes, planned {want}")
        sink.close()
    except BaseException:
        sink.abort()
        os.close(fd)
        raise
    if then is None:
        _finish(fd, sink.digest(), None)
        return
    if not _durable_pool:
        _durable_pool.append(cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync"))
    _durable.append(_durable_pool[0].submit(_finish, fd, sink.digest(), then))
