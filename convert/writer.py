"""A streaming safetensors writer.

The safetensors layout is ``u64 header length | JSON header | raw tensor bytes``; offsets in the
header depend only on shapes and dtypes, so the header is written first and each tensor's bytes
are streamed after it in row chunks. A file is never held in memory, and the same plan always
gives the same bytes.

Hot path (``iter_chunks`` into ``write_file``): chunks are ``FileSpan``s (bytes
of a source file, already in the output's layout) and ``ByteChunk``s (compacted or converted rows,
zero padding), see convert.chunks; calibrated torch tensors come as ByteChunks too
(``quantize.torch_io``). Files are written with
``O_DIRECT`` (``common.fileio.DirectSink``: spans are ``pread`` into aligned staging buffers that
two threads write out), which on the VM measured in BENCHMARKS.md is 2-4x faster than going
through the page cache. Every staging buffer is also fed to a BLAKE3 hash on another thread, and
the digest is recorded in the run's ``common.digests.Digests`` (``write_file(..., digests=)``) for build.json, which therefore never reads an output
back. Where the file system refuses ``O_DIRECT`` (tmpfs) or ``BUILD_ENGINE_DIRECT_IO=0``, files go
through the page cache, spans copied file to file by the kernel (``copy_file_range``, as ``cp``
does; build.json then hashes them).

``write_file(..., then=...)`` returns before its fsync: the fsync, and then ``then`` (the rename
that marks the file complete), run on a thread while the caller writes the next file;
``wait_durable()`` waits for them.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import os
from pathlib import Path

import blake3

from common.digests import Digests
from common.dtypes import as_dtype
from common.errors import naming
from common.fileio import DirectSink, nbytes, write_all  # noqa: F401 (nbytes re-exported)
from common.fileio import header_bytes as _header_bytes

from .chunks import CHUNK_BYTES, ByteChunk, FileSpan, iter_chunks  # noqa: F401 (re-exported)

# Direct I/O: "auto" and "1" (every file, where the file system takes it), "0" (never); the
# environment variable BUILD_ENGINE_DIRECT_IO overrides it.
DIRECT_IO = "auto"


def header_bytes(tensors) -> bytes:
    """The header of a rank file holding ``tensors`` (objects with name, shape, dtype), with
    the metadata ``save_file`` writes for torch."""
    return _header_bytes(tensors, {"format": "pt"})


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
        write_all(dst, view[:got])
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
        write_all(self.fd, data)

    def copy(self, span: FileSpan) -> None:
        self._hash = None  # those bytes never reach user space: build.json reads the file
        _copy_span(span, self.fd)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def digest(self) -> str | None:
        return self._hash.hexdigest() if self._hash is not None else None


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
                return fd, DirectSink(fd)
            except BaseException:
                os.close(fd)
                raise
    fd = os.open(path, flags, 0o666)
    return fd, _BufferedSink(fd)


_durable: list[cf.Future] = []
_durable_pool: list[cf.ThreadPoolExecutor] = []


def _finish(fd: int, digest: str | None, digests: Digests | None, then) -> None:
    """fsync, record the digest (the file's final size and mtime are its key), close, then."""
    try:
        os.fsync(fd)
        if digest is not None and digests is not None:
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


def write_file(path: Path, tensors, produce, on_bytes=None, then=None,
               digests: Digests | None = None) -> None:
    """Write ``tensors`` (with name/shape/dtype, a DType or torch dtype) to ``path``;
    ``produce(t)`` yields t's chunks, ``FileSpan``s and ``ByteChunk``s, written as they are.

    ``on_bytes(n)`` is called as data is written (progress). Each chunk's size is checked, so a
    wrong plan cannot produce a file whose header lies. The file is fsynced before returning; with
    ``then`` (e.g. the rename that marks the file complete), the fsync and then ``then()`` run on
    a thread and this returns at once (``wait_durable()`` waits for them, in order).
    ``digests``: the run's record of output digests, told this file's when the writer took one.
    """
    header = header_bytes(tensors)
    with naming(path):  # a failed write names the file it was writing
        fd, sink = _open_sink(Path(path))
        _write_tensors(fd, sink, header, tensors, produce, on_bytes)
    if then is None:
        with naming(path):
            _finish(fd, sink.digest(), digests, None)
        return
    if not _durable_pool:
        _durable_pool.append(cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync"))
    _durable.append(_durable_pool[0].submit(_finish_named, path, fd, sink.digest(), digests, then))


def _finish_named(path, *args) -> None:
    with naming(path):
        _finish(*args)


def _write_tensors(fd: int, sink, header: bytes, tensors, produce, on_bytes) -> None:
    """The header then each tensor's chunks into ``sink``, closed (unflushed) on success; on any
    failure the sink is abandoned and ``fd`` closed."""
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
                else:  # torch tensors become ByteChunks torch-side (quantize.torch_io)
                    raise TypeError(f"{t.name}: a chunk is a FileSpan or a ByteChunk, not "
                                    f"{type(chunk).__name__}")
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
