"""A safetensors file's JSON header, read without touching its data (``struct`` + ``json``): what
the converter's source reader and ``build_engine check`` both start from."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from common.errors import UserError

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header length


def read_header(path: Path) -> tuple[dict, int]:
    """(header, absolute offset of the data section), checked against the file size; a
    ``UserError`` (one line) when the file is short, truncated or not safetensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
        data_len = size - 8 - n
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if end > data_len:
            raise ValueError(f"tensor data needs {end} bytes but the file holds {data_len}")
        return header, 8 + n
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                        f"or corrupt: re-download it")
