"""Lazy access to a Hugging Face checkpoint's safetensors shards.

Nothing is read until a slice is asked for: shapes and dtypes come from the file headers, and
``read(name, index)`` pulls only the bytes of that slice (``safe_open(...).get_slice``), so memory
does not grow with the model.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError

INDEX = "model.safetensors.index.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
        data_len = size - 8 - n
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if end > data_len:
            raise ValueError(f"tensor data needs {end} bytes but the file holds {data_len}")
        return header
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                        f"or corrupt: re-download it")


class SourceCheckpoint:
    """Name → (file, shape, dtype) for every tensor of a HF model dir; slices read on demand."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self.files = self._find_files()
        self.meta: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                if name == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                self.meta[name] = (path, tuple(info["shape"]), dtype)
        self._handles: dict[Path, object] = {}

    def _find_files(self) -> list[Path]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index} is not a valid safetensors index ({e})")
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index} names shard {missing[0]} which is not in {self.dir}: "
                                f"download the missing shard(s)")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        if list(self.dir.glob("*.bin")) or list(self.dir.glob("*.pt")):
            raise UserError(f"{self.dir} holds only PyTorch pickle weights (*.bin); they can run "
                            f"code when loaded, so they are refused: convert them to safetensors "
                            f"first (e.g. transformers' save_pretrained(safe_serialization=True))")
        raise UserError(f"{self.dir} has no *.safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name][2]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        path = self.meta[name][0]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        try:
            part = handle.get_slice(name)
            return part[index] if index else part[:]
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"cannot read tensor {name} from {path} ({e}); the file may be corrupt")
