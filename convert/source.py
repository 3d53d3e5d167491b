"""Lazy access to a Hugging Face checkpoint's safetensors shards.

Nothing is read until a slice is asked for: shapes and dtypes come from the file headers, and
``read(name, index)`` pulls only the bytes of that slice, so memory does not grow with the model.

Reads are ``pread`` calls at the offsets the header gives, straight into the returned tensor (one
copy out of the page cache). Nothing is memory-mapped: a mapping's touched pages count in the
process's RSS and would grow it to the size of the shards read. ``span(name)`` exposes where a
tensor's bytes are (file descriptor, offset), so the writer can copy them file to file in the
kernel when no conversion is needed. Indexing other than plain slices falls back to safetensors'
``get_slice``.

Dtypes are ``common.dtypes.DType``s (safetensors' names, item sizes): opening a checkpoint and
reading bytes (``read_rows_bytes``) never imports torch; ``read`` and ``read_rows_into`` return or
fill torch tensors and import it then.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from common.dtypes import DType
from common.errors import UserError
from common.fileio import pread_exact

from . import source_files

if TYPE_CHECKING:
    import torch

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
        self._handles: dict[Path, object] = {}
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
        self._handles.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, the tensor's dtype, shape ``(n, *shape[1:])``) with rows
        ``start:start+n`` of ``name``; return ``out``."""
        if str(out.dtype) != str(self.meta[name][2]) or not out.is_contiguous():
            raise ValueError(f"read_rows_into({name}): bad out {tuple(out.shape)} {out.dtype}")
        self.read_rows_bytes(name, start, _byte_view(out))
        return out

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

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        fast = self._read_fast(name, index)
        if fast is not None:
            return fast
        path = self.meta[name][0]
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[path] = safe_open(str(path), framework="pt")
        try:
            part = handle.get_slice(name)
            return part[index] if index else part[:]
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"cannot read tensor {name} from {path} ({e}); the file may be corrupt")

    def _read_fast(self, name: str, index) -> torch.Tensor | None:
        """Plain slices (step 1) with pread; None when the index needs the general path."""
        import torch

        path, shape, dtype = self.meta[name]
        dtype = dtype.torch
        index = tuple(index)
        if len(index) > len(shape) or not all(
                isinstance(s, slice) and s.step in (None, 1) for s in index):
            return None
        bounds = [s.indices(d)[:2] for s, d in zip(index, shape)]
        bounds = [(a, max(a, b)) for a, b in bounds]
        bounds += [(0, d) for d in shape[len(bounds):]]
        if not shape:  # a scalar
            out = torch.empty((), dtype=dtype)
            if dtype.itemsize:
                pread_exact(self._fd(path), _byte_view(out.reshape(1)), self._offsets[name], path)
            return out
        (r0, r1), rest = bounds[0], bounds[1:]
        full_rest = all(a == 0 and b == d for (a, b), d in zip(rest, shape[1:]))
        if not full_rest and any(a != 0 or b != d for (a, b), d in zip(rest[1:], shape[2:])):
            return None  # slices beyond dim 1: rare, left to safetensors
        rows = torch.empty((r1 - r0, *shape[1:]), dtype=dtype)
        if rows.numel():
            self.read_rows_into(name, r0, rows)
        if full_rest:
            return rows
        (c0, c1) = rest[0]
        return rows[:, c0:c1].contiguous()


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of contiguous ``t``'s storage."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
