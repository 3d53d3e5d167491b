"""Lazy access to a Hugging Face checkpoint's safetensors shards.

Nothing is read until a slice is asked for: shapes and dtypes come from the file headers, and
``read(name, index)`` pulls only the bytes of that slice, so memory does not grow with the model.

Reads are ``pread`` calls at the offsets the header gives, straight into the returned array (one
copy out of the page cache). Nothing is memory-mapped: a mapping's touched pages count in the
process's RSS and would grow it to the size of the shards read. ``span(name)`` exposes where a
tensor's bytes are (file descriptor, offset), so the writer can copy them file to file in the
kernel when no conversion is needed.

Dtypes are ``common.dtypes.DType``s (safetensors' names, item sizes) and tensors are read as their
raw bits (``read_bits``: numpy unsigned integers of the item size, as bfloat16 has no numpy dtype),
so this module needs no torch; ``quantize.torch_io.read_tensor`` views them as torch tensors for
calibration and verification.
"""
from __future__ import annotations

import os
from pathlib import Path
import numpy as np

from common.dtypes import DType
from common.errors import UserError
from common.fileio import pread_exact

from . import source_files
from .casts import UINT

INDEX = source_files.INDEX

def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked as the safetensors library checks it."""
    return source_files.read_header(path)[0]


class SourceCheckpoint:
    """Name → (file, shape, dtype) for every tensor of a HF model dir; slices read on demand.
    Opening it checks the files and headers (convert.source_files); ``declared_dtype``: the
    config's ``torch_dtype``, which a float model's tensors must match in kind."""

    def __init__(self, model_dir, declared_dtype: str | None = None):
        self.dir = Path(model_dir)
        self.files, self.meta, self._offsets = source_files.tensor_table(self.dir)
        source_files.check_float_model(self.meta, declared_dtype)
        self._fds: dict[Path, int] = {}
        self._scan = None

    def scan(self, background: bool = True):
        """The files' one read for their digests and non-finite values
        (``common.source_scan.SourceScan``), started on the first call."""
        if self._scan is None:
            from common.source_scan import SourceScan

            self._scan = SourceScan(source_files.scan_table(self.files, self.meta, self._offsets),
                                    background=background)
        return self._scan

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def dtype(self, name: str) -> DType:
        return self.meta[name][2]

    def stored(self, name: str) -> bool:
        """Whether ``name``'s bytes are in a file as they are read (a span can copy them);
        False for a tensor computed when read (convert/block_fp8.py)."""
        return True

    def span(self, name: str) -> tuple[int, int]:
        """(open read-only fd, absolute offset) of ``name``'s bytes (row-major, its dtype)."""
        return self._fd(self.meta[name][0]), self._offsets[name]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise UserError(f"cannot open {path}: {e.strerror or e}")
            if hasattr(os, "posix_fadvise"):
                # reads run through each tensor in order: a larger readahead window (as cp asks
                # for) doubles the cold-cache read rate
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_rows_bytes(self, name: str, start: int, buf: memoryview) -> None:
        """Fill ``buf`` (bytes, a whole number of rows) with rows from ``start`` of ``name``."""
        path, shape, dtype = self.meta[name]
        row = dtype.itemsize
        for d in shape[1:]:
            row *= d
        nb = len(buf)
        if start < 0 or (nb % row if row else nb) or \
                start * row + nb > row * (shape[0] if shape else 1):
            raise ValueError(f"read_rows_bytes({name}): bad buffer of {nb} bytes at row {start}")
        if nb:
            pread_exact(self._fd(path), buf, self._offsets[name] + start * row, path)

    def read_bits(self, name: str, index: tuple = ()) -> np.ndarray:
        """``name[index]`` (numpy basic indexing) as raw bits: a new C-contiguous array of
        ``convert.casts.UINT[itemsize]``. The rows an index's first slice (step 1) covers are read
        with ``pread`` and only those; any other index reads the whole tensor first."""
        _, shape, dtype = self.meta[name]
        index = tuple(index)
        first = index[0] if index else slice(None)
        if shape and isinstance(first, slice) and first.step in (None, 1):
            r0, r1 = first.indices(shape[0])[:2]
            r1 = max(r0, r1)
            index = (slice(None), *index[1:])
        else:
            r0, r1 = 0, (shape[0] if shape else 1)
        rows = _aligned_empty((r1 - r0, *shape[1:]) if shape else (), UINT[dtype.itemsize])
        if rows.size:
            self.read_rows_bytes(name, r0, memoryview(rows.reshape(-1)).cast("B"))
        if not index or rows[index].flags.c_contiguous:
            return rows[index] if index else rows
        out = _aligned_empty(rows[index].shape, rows.dtype)
        np.copyto(out, rows[index])
        return out


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` at an address aligned as torch's CPU allocator aligns (64 bytes): MKL's
    reproducible mode (MKL_CBWR) gives the same sums only for the same alignment, so a tensor
    read here computes exactly as one torch allocated."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)
