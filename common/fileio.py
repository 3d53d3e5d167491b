"""Bytes to and from files: exact ``pread``s, whole writes, the safetensors header, and an
``O_DIRECT`` sink that writes a file through aligned staging buffers (hashed on the way).

Shared by the converter's writer (convert.writer, rank files) and the calibration store
(quantize.direct_save), which may not import each other. The safetensors layout is ``u64 header
length | JSON header | raw tensor bytes``; offsets in the header depend only on shapes and dtypes,
so the header is written first and each tensor's bytes streamed after it.
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

import numpy as np

from .dtypes import as_dtype
from .errors import UserError

# 128 MiB: this VM's disk takes 3.84 GB of O_DIRECT writes, two in flight, in 1.6-2.2 s with
# 128 MiB writes against 1.7-3.6 s with 32 MiB ones (interleaved rounds, BENCHMARKS.md issue 15;
# a write is split into 4 MiB requests, so a larger one keeps more of them queued); 4 buffers,
# 512 MiB of RSS while a file is written
DIRECT_BUFFER = 128 * 2**20
DIRECT_BUFFERS = 4
DIRECT_ALIGN = 4096
# two writes in flight: a writer thread waits for the GIL after each write while the main thread
# copies bytes under it, and the disk idles meanwhile unless the other writer's write is queued
DIRECT_WRITERS = 2
# a file's first writes are smaller (8, then 32 MiB, then DIRECT_BUFFER): the disk idles until the
# first buffer is full, which at the start of a run also means first-touching it (see the pool);
# the first write of a 7B-shaped conversion left 0.01-0.02 s after its file opened, not 0.16 s
DIRECT_RAMP = (8 * 2**20, 32 * 2**20)


def nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def header_bytes(tensors, metadata: dict | None = None) -> bytes:
    """The header for ``tensors`` (objects with name, shape, dtype: a DType, torch dtype or name)
    in their order, with string ``metadata``."""
    header, offset = {}, 0
    for t in tensors:
        dtype = as_dtype(t.dtype)
        size = nbytes(t.shape, dtype)
        header[t.name] = {"dtype": dtype.st, "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself pads
    return struct.pack("<Q", len(raw)) + raw


def write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def pread_exact(fd: int, buf: memoryview, offset: int, path=None) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a short file is a corrupt checkpoint."""
    done, n = 0, len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise UserError(f"{path or fd} ends early at byte {offset + done}; the file is "
                            f"truncated: re-download it")
        done += got


# Within ``reusing_buffers()`` staging buffers are kept for the next file: first-touching fresh
# memory costs this VM ~0.7 s per GB (page faults through the hypervisor; measured 0.35-0.62 s for
# 512 MiB against 0.04 s to rewrite it), and a conversion writes a file per rank
_POOL: dict[int, list[mmap.mmap]] = {}
_POOL_USERS = [0]
_POOL_LOCK = threading.Lock()


@contextlib.contextmanager
def reusing_buffers():
    """Keep the sinks' staging buffers for the next file until the outermost block ends."""
    with _POOL_LOCK:
        _POOL_USERS[0] += 1
    try:
        yield
    finally:
        with _POOL_LOCK:
            _POOL_USERS[0] -= 1
            drop = [b for bufs in _POOL.values() for b in bufs] if not _POOL_USERS[0] else []
            if drop:
                _POOL.clear()
        _close(drop)


def _take_buffers(size: int, n: int) -> list[mmap.mmap]:
    """``n`` page-aligned buffers of ``size`` bytes, from the pool where it has them."""
    with _POOL_LOCK:
        free = _POOL.get(size, [])
        got = [free.pop() for _ in range(min(n, len(free)))]
    return got + [mmap.mmap(-1, size) for _ in range(n - len(got))]


def _give_back(bufs: list[mmap.mmap]) -> None:
    with _POOL_LOCK:
        if _POOL_USERS[0]:
            for b in bufs:
                _POOL.setdefault(len(b), []).append(b)
            return
    _close(bufs)


def _close(bufs: list[mmap.mmap]) -> None:
    for b in bufs:
        try:
            b.close()
        except BufferError:  # still viewed somewhere: freed with the last view
            pass


class DirectSink:
    """Appends to an ``O_DIRECT`` fd through aligned staging buffers, hashed by one thread (unless
    ``hashed=False``) and written out by others, side by side.

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

    def __init__(self, fd: int, buf_bytes: int | None = None, nbufs: int | None = None,
                 hashed: bool = True):
        buf_bytes = buf_bytes or DIRECT_BUFFER
        self.fd, self.size, self.length, self._offset = fd, buf_bytes, 0, 0
        self._bufs = _take_buffers(buf_bytes, nbufs or DIRECT_BUFFERS)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        self._users: dict[int, int] = {}  # id(buffer) -> threads still using it (hash, write)
        self._lock = threading.Lock()
        for b in self._bufs[1:]:
            self._free.put(b)
        self._cur, self._view, self._pos = self._bufs[0], memoryview(self._bufs[0]), 0
        self._ramp = [n for n in DIRECT_RAMP if n < buf_bytes]
        self._fill = self._next_fill()  # where the current buffer is sent
        if hashed:  # imported here: the page-reading helpers above also run where it is absent
            import blake3  # (the Triton server's environment, through convert.source)

        self._hash = blake3.blake3() if hashed else None
        self._error: BaseException | None = None
        self._nwriters = DIRECT_WRITERS
        self._threads = [threading.Thread(target=self._run_hash, name="direct-hash", daemon=True)
                         for _ in range(hashed)]
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
            pwrite_all(self.fd, data, offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # the file system took O_DIRECT at open but refuses it on write: go buffered
            with self._lock:
                fcntl.fcntl(self.fd, fcntl.F_SETFL,
                            fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            pwrite_all(self.fd, data, offset)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _next_fill(self) -> int:
        return self._ramp.pop(0) if self._ramp else self.size

    def _submit(self, n: int, real: int | None = None, last: bool = False) -> None:
        """Hand the current buffer's first ``n`` bytes (``real`` of them the file's) to the
        threads; unless ``last``, go on in the next free buffer."""
        self._check()
        with self._lock:
            self._users[id(self._cur)] = 1 + (self._hash is not None)
        if self._hash is not None:
            self._to_hash.put((self._cur, n if real is None else real))
        self._full.put((self._cur, n, self._offset))
        self._offset += n
        if last:
            return
        self._cur = self._free.get()
        self._view, self._pos = memoryview(self._cur), 0
        self._fill = self._next_fill()

    def _advance(self, k: int) -> None:
        """``k`` more bytes are in the current buffer: send it once it is as full as it gets."""
        self._pos += k
        self.length += k
        if self._pos == self._fill:
            self._submit(self._fill)

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(data):
            k = min(len(data), self._fill - self._pos)
            # numpy's copy lets go of the GIL (a memoryview slice assignment holds it), so the
            # writer threads are not kept from issuing their next write meanwhile
            np.copyto(np.frombuffer(self._view[self._pos:self._pos + k], np.uint8),
                      np.frombuffer(data[:k], np.uint8))
            data = data[k:]
            self._advance(k)

    def copy(self, span) -> None:
        """Append ``span.nbytes`` bytes of the file ``span.fd`` from ``span.offset``."""
        done = 0
        while done < span.nbytes:
            k = min(span.nbytes - done, self._fill - self._pos)
            try:
                pread_exact(span.fd, self._view[self._pos:self._pos + k], span.offset + done)
            except Exception as e:
                raise OSError(errno.EIO, str(e)) from e
            done += k
            self._advance(k)

    def close(self) -> None:
        if self._pos:
            padded = -(-self._pos // DIRECT_ALIGN) * DIRECT_ALIGN
            self._view[self._pos:padded] = bytes(padded - self._pos)
            self._submit(padded, self._pos, last=True)  # no next buffer: _stop waits for them all
        self._stop()
        self._check()
        os.ftruncate(self.fd, self.length)

    def abort(self) -> None:
        self._stop()

    def digest(self) -> str | None:
        """The BLAKE3 digest (hex) of what was written; None when not ``hashed``."""
        return self._hash.hexdigest() if self._hash is not None else None

    def _stop(self) -> None:
        if self._hash is not None:
            self._to_hash.put(None)
        for _ in range(self._nwriters):
            self._full.put(None)
        for t in self._threads:
            t.join()
        self._view.release()
        _give_back(self._bufs)
        self._bufs = []
