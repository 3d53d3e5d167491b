"""Tensor dtypes as bytes: safetensors' names and item sizes.

The float path (plan, source, writer) moves bytes, so it describes a tensor's dtype by what the
file format needs (``"F16"``, 2 bytes) and never imports torch (1.9-5.4 s of a conversion that
takes seconds, BENCHMARKS.md). ``DType.torch`` maps to torch's dtype, importing torch, where a
transform really computes (dtype casts, quantization). A ``DType`` prints as torch's dtype does
(``torch.float16``), so fingerprints and messages read as before.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    st: str               # safetensors' name: "F16"
    itemsize: int         # bytes per element
    torch_name: str       # torch's attribute: "float16"
    is_floating_point: bool

    @property
    def torch(self):
        import torch

        return getattr(torch, self.torch_name)

    def __str__(self) -> str:
        return f"torch.{self.torch_name}"


_ALL = [DType("F64", 8, "float64", True), DType("F32", 4, "float32", True),
        DType("F16", 2, "float16", True), DType("BF16", 2, "bfloat16", True),
        DType("I64", 8, "int64", False), DType("I32", 4, "int32", False),
        DType("I16", 2, "int16", False), DType("I8", 1, "int8", False),
        DType("U8", 1, "uint8", False), DType("BOOL", 1, "bool", False),
        DType("F8_E4M3", 1, "float8_e4m3fn", True), DType("F8_E5M2", 1, "float8_e5m2", True)]
BY_ST = {d.st: d for d in _ALL}
BY_NAME = {d.torch_name: d for d in _ALL}  # also config.json's "dtype" values
FLOAT16, BFLOAT16, FLOAT32 = BY_NAME["float16"], BY_NAME["bfloat16"], BY_NAME["float32"]


def as_dtype(dtype) -> DType:
    """``dtype`` (a DType, a ``torch.dtype`` or a name such as "float16") as a DType, without
    importing torch (a ``torch.dtype`` prints as ``torch.<name>``)."""
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype)
    found = BY_NAME.get(name[len("torch."):] if name.startswith("torch.") else name)
    if found is None:
        raise ValueError(f"no safetensors dtype for {dtype!r}")
    return found
