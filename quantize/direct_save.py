"""``safetensors.torch.save_file`` for the calibration store, written with ``O_DIRECT``.

A layer's store file (0.22 GB of int8/fp8 tensors at 8B shapes) is written on a thread while the
next layer calibrates; through the page cache that write costs ~0.4-0.5 s of CPU on this VM
(page allocation, copy, writeback), taken from the calibration's two cores. Here the tensors'
bytes are copied once into aligned buffers and go to the disk by DMA (common.fileio's sink, the
converter's own, hashed with BLAKE3 on its thread as it writes: the store records each file's
digest and checks it when the file is read back): ~0.05 s of CPU, ~0.05 s more of hashing.
The file is the safetensors format that ``safe_open`` / ``load_file`` read; where the file
system refuses ``O_DIRECT`` at open (tmpfs) it is ``save_file`` itself.
"""
from __future__ import annotations

import errno
import os
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from common.digests import file_blake3
from common.errors import naming
from common.fileio import DirectSink, header_bytes

# two 8 MiB buffers: the store writes while a layer calibrates, so it keeps its RSS small
_BUFFER = 8 * 2**20


class _Entry(NamedTuple):
    name: str
    shape: tuple
    dtype: torch.dtype


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _write_direct(fd: int, tensors: dict[str, torch.Tensor], metadata: dict | None) -> str:
    sink = DirectSink(fd, buf_bytes=_BUFFER, nbufs=2, hashed=True)
    try:
        sink.write(memoryview(header_bytes(
            [_Entry(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], metadata)))
        for t in tensors.values():
            sink.write(_raw(t))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink.digest()


def _standalone(state: dict) -> dict:
    """``state``'s tensors, each as itself when it is its whole storage and the first to use it
    (safetensors writes it from there), else a contiguous copy (views, expanded tensors, one
    tensor under several names: ``save_file`` refuses shared storage)."""
    out, seen = {}, set()
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and ptr not in seen and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        seen.add(ptr)
        out[k] = t if whole else t.contiguous().clone()
    return out


def save(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> str:
    """Write ``tensors`` (and string ``metadata``) to ``path`` as a safetensors file; return its
    BLAKE3 digest (hex). A failed write removes it and raises naming it."""
    with naming(path):
        try:
            return _save(tensors, path, metadata)
        except BaseException:
            if os.path.lexists(path):
                os.unlink(path)
            raise


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        save_file(_standalone(tensors), path, metadata=metadata)
        return file_blake3(path)
    try:
        return _write_direct(fd, tensors, metadata)  # refused writes fall back inside the sink
    finally:
        os.close(fd)
