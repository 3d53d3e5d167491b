"""``safetensors.torch.save_file`` for the calibration store, written with ``O_DIRECT``.

A layer's store file (0.22 GB of int8/fp8 tensors at 8B shapes) is written on a thread while the
next layer calibrates; through the page cache that write costs ~0.4-0.5 s of CPU on this VM
(page allocation, copy, writeback), taken from the calibration's two cores. Here the tensors'
bytes are copied once into an aligned buffer and go to the disk by DMA: ~0.05 s of CPU. The
file is the safetensors format (little-endian u64 header length, JSON header padded with spaces
to 8 bytes, the tensors' bytes in header order) that ``safe_open`` / ``load_file`` read; where
the file system refuses ``O_DIRECT`` (tmpfs) it is ``save_file`` itself.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct

import torch
from safetensors.torch import save_file

# the safetensors dtype names of what the store holds
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
           torch.float8_e5m2: "F8_E5M2"}
_ALIGN = 4096
_BUFFER = 8 * 2**20


def _header(tensors: dict[str, torch.Tensor], metadata: dict | None) -> bytes:
    head, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        head[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class _Aligned:
    """Appends to an ``O_DIRECT`` fd through one aligned buffer; ``finish`` pads the tail and
    truncates the file to its real length."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.pos, self.length = fd, mmap.mmap(-1, _BUFFER), 0, 0

    def put(self, data: memoryview) -> None:
        while len(data):
            k = min(len(data), _BUFFER - self.pos)
            self.buf[self.pos:self.pos + k] = data[:k]
            self.pos, self.length, data = self.pos + k, self.length + k, data[k:]
            if self.pos == _BUFFER:
                self._flush(_BUFFER)

    def _flush(self, n: int) -> None:
        with memoryview(self.buf) as view:
            done = 0
            while done < n:
                done += os.write(self.fd, view[done:n])
        self.pos = 0

    def finish(self) -> None:
        if self.pos:
            padded = -(-self.pos // _ALIGN) * _ALIGN
            self.buf[self.pos:padded] = bytes(padded - self.pos)
            self._flush(padded)
        os.ftruncate(self.fd, self.length)


def _write_direct(fd: int, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    out = _Aligned(fd)
    try:
        out.put(memoryview(_header(tensors, metadata)))
        for t in tensors.values():
            out.put(_raw(t))
        out.finish()
    finally:
        out.buf.close()


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


def save(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` as a safetensors file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return save_file(_standalone(tensors), path, metadata=metadata)
    try:
        _write_direct(fd, tensors, metadata)
        return
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # refused at the first write (no O_DIRECT after all): the plain way, below
    finally:
        os.close(fd)
    save_file(_standalone(tensors), path, metadata=metadata)
