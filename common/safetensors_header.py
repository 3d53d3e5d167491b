"""A safetensors file's JSON header, read without touching its data (``struct`` + ``json``) and
checked as strictly as the safetensors library checks it: what the converter's source reader and
``build_engine check`` both start from. Tensor data must be contiguous from offset 0 to the end of
the file, without gaps or overlaps (safetensors' ``validate``), each span its shape x dtype."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from common.dtypes import BY_ST, DType
from common.errors import UserError

MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a readable safetensors file ({why}); it may be truncated or "
                     f"corrupt: re-download it")


def read_header(path: Path) -> tuple[dict, int]:
    """(header, absolute offset of the data section), the header's spans checked as the
    safetensors library checks them."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise _corrupt(path, "header length points past the end of the file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise _corrupt(path, e.strerror or str(e))
    except ValueError as e:
        raise _corrupt(path, f"header is not JSON: {e}")
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    _check_spans(path, header, size - 8 - n)
    return header, 8 + n


def tensor_span(path: Path, name: str, info) -> tuple[int, int, DType]:
    """(begin, end, DType) of one header entry, its span checked against its shape x dtype."""
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
        raise _corrupt(path, f"tensor {name} has no shape")
    dtype = BY_ST.get(info.get("dtype"))
    if dtype is None:
        raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(type(x) is int and x >= 0 for x in offsets)) or \
            not all(type(d) is int and d >= 0 for d in info["shape"]):
        raise UserError(f"{path}: tensor {name} has no valid data_offsets; the file is corrupt: "
                        f"re-download it")
    begin, end = offsets
    numel = 1
    for d in info["shape"]:
        numel *= d
    if end - begin != numel * dtype.itemsize:
        raise UserError(f"{path}: tensor {name} spans {end - begin} bytes but its shape "
                        f"{info['shape']} and dtype need {numel * dtype.itemsize}; the file is "
                        f"corrupt: re-download it")
    return begin, end, dtype


def _check_spans(path: Path, header: dict, data_len: int) -> None:
    """Every tensor's bytes, in offset order, start where the previous ones end (the first at 0)
    and the last ends at the end of the file: no overlap, no gap, nothing out of bounds."""
    spans = sorted((tensor_span(path, k, v)[:2], k) for k, v in header.items() if k != "__metadata__")
    at, prev = 0, None
    for (begin, end), name in spans:
        if begin != at:
            how = f"overlaps tensor {prev}" if begin < at else f"leaves a gap after {prev or 'the header'}"
            raise _corrupt(path, f"tensor {name}'s data at bytes {begin}-{end} {how}")
        at, prev = end, name
    if at != data_len:
        raise _corrupt(path, f"tensor data needs {at} bytes but the file holds {data_len}")
