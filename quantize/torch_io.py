"""The torch side of the converter's byte-level I/O: ``convert/`` reads and writes raw bits (numpy)
and never imports torch; calibration, quantization and verification compute on torch tensors.

- ``read_tensor(source, name, index)``: a slice of a ``convert.source.SourceCheckpoint`` tensor as
  a torch tensor (the bits ``read_bits`` preads, viewed as the tensor's dtype: no copy).
- ``tensor_chunk(t)`` / ``torch_chunks(produce)``: torch tensors as the ``ByteChunk``s that
  ``convert.writer.write_file`` takes (calibrated weights and scales, unified checkpoints).
- ``TORCH_DTYPES``: config.json's float dtype names -> torch dtypes.
"""
from __future__ import annotations

import torch

from common.dtypes import BY_NAME, as_dtype
from convert.chunks import ByteChunk, FileSpan

TORCH_DTYPES = {n: BY_NAME[n].torch for n in ("float16", "bfloat16", "float32")}
#: numpy's unsigned bits cross into torch as the integer torch fully supports of their size
_SIGNED = {1: "u1", 2: "i2", 4: "i4", 8: "i8"}


def read_tensor(source, name: str, index: tuple = ()) -> torch.Tensor:
    """``name[index]`` of ``source`` (plain slices; numpy's basic indexing) as a contiguous CPU
    tensor of the file's dtype."""
    bits = source.read_bits(name, index)
    dtype = source.dtype(name)
    return torch.from_numpy(bits.view(_SIGNED[dtype.itemsize])).view(dtype.torch)


def tensor_chunk(t: torch.Tensor) -> ByteChunk:
    """``t``'s bytes (row-major) as a ByteChunk; the chunk keeps ``t``'s memory alive."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return ByteChunk(memoryview(data), as_dtype(t.dtype))


def torch_chunks(produce):
    """``produce`` (tensor -> chunks) with the torch tensors it yields turned into ByteChunks."""
    def wrapped(t):
        for chunk in produce(t):
            yield chunk if isinstance(chunk, (FileSpan, ByteChunk)) else tensor_chunk(chunk)

    return wrapped
