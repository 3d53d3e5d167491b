"""A streaming safetensors writer.

The safetensors layout is ``u64 header length | JSON header | raw tensor bytes``; offsets in the
header depend only on shapes and dtypes, so the header is written first and each tensor's bytes
are streamed after it in row chunks. A file is never held in memory, and the same plan always
gives the same bytes.
"""
from __future__ import annotations

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


def iter_chunks(source, piece, dtype: torch.dtype, max_bytes: int = CHUNK_BYTES):
    """Yield ``piece`` (a convert.shard.Piece) as tensors of ``dtype``, a few rows at a time."""
    rows = piece.shape[0]
    row_bytes = max(1, nbytes(piece.shape[1:], dtype))
    step = max(1, max_bytes // row_bytes)
    if piece.source is None:
        for a in range(0, rows, step):
            yield torch.zeros((min(step, rows - a), *piece.shape[1:]), dtype=dtype)
        return
    first = piece.index[0] if piece.index else slice(None)
    start = first.start or 0
    rest = tuple(piece.index[1:])
    for a in range(0, rows, step):
        b = min(rows, a + step)
        yield source.read(piece.source, (slice(start + a, start + b), *rest)).to(dtype)


def write_file(path: Path, tensors, produce, on_bytes=None) -> None:
    """Write ``tensors`` (with name/shape/dtype) to ``path``; ``produce(t)`` yields t's chunks.

    ``on_bytes(n)`` is called as data is written (progress). Each chunk's size is checked, so a
    wrong plan cannot produce a file whose header lies.
    """
    with open(path, "wb") as f:
        f.write(header_bytes(tensors))
        for t in tensors:
            want = nbytes(t.shape, t.dtype)
            done = 0
            for chunk in produce(t):
                if chunk.dtype != t.dtype:
                    raise AssertionError(f"{t.name}: produced {chunk.dtype}, planned {t.dtype}")
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                done += data.nbytes
                if on_bytes:
                    on_bytes(data.nbytes)
            if done != want:
                raise AssertionError(f"{t.name}: wrote {done} bytes, planned {want}")
        f.flush()
        os.fsync(f.fileno())
