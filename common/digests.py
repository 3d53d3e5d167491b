"""BLAKE3 digests of the files this process wrote, taken by ``convert.writer`` while writing
them, so ``build.json`` (builders.manifest) need not read them back from disk.

Keyed by the file's identity and state, ``(st_dev, st_ino, st_size, st_mtime_ns)``: a rename
(``rank0.safetensors.tmp`` -> ``rank0.safetensors``, ``checkpoint.partial`` -> ``checkpoint``)
keeps the key, any later write changes the size or mtime and so the key (then the file is
hashed from disk as before). Nothing here imports torch.
"""
from __future__ import annotations

import os
import threading

_KNOWN: dict[tuple, str] = {}
_LOCK = threading.Lock()


def _key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def record(fd: int, blake3_hex: str) -> None:
    """``fd``'s file (closed for writing afterwards) has this BLAKE3 digest (hex)."""
    key = _key(os.fstat(fd))
    with _LOCK:
        _KNOWN[key] = blake3_hex


def known(path) -> str | None:
    """The BLAKE3 digest (hex) recorded for ``path`` in its current state, or None."""
    try:
        key = _key(os.stat(path))
    except OSError:
        return None
    with _LOCK:
        return _KNOWN.get(key)
