"""BLAKE3 digests of the files one run wrote, taken by ``convert.writer`` while writing them, so
``build.json`` (builders.manifest) need not read them back from disk.

A :class:`Digests` is made per run and handed to the writers (which record into it) and then to
the manifest (which looks files up in it). Keyed by the file's identity and state,
``(st_dev, st_ino, st_size, st_mtime_ns)``: a rename (``rank0.safetensors.tmp`` ->
``rank0.safetensors``, ``checkpoint.partial`` -> ``checkpoint``) keeps the key, any later write
changes the size or mtime and so the key (then the file is hashed from disk as before). Nothing
here imports torch.
"""
from __future__ import annotations

import os
import threading


def _key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Digests:
    """The digests one run's writers took; thread-safe (the writer records from its fsync
    threads). Not shared with worker processes: what they write is hashed from disk."""

    def __init__(self):
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def record(self, fd: int, blake3_hex: str) -> None:
        """``fd``'s file (closed for writing afterwards) has this BLAKE3 digest (hex)."""
        key = _key(os.fstat(fd))
        with self._lock:
            self._known[key] = blake3_hex

    def record_path(self, path, blake3_hex: str) -> None:
        """``path`` (closed, as it is now) has this BLAKE3 digest (hex): e.g. a rank a worker
        process wrote, or one checked on resume."""
        key = _key(os.stat(path))
        with self._lock:
            self._known[key] = blake3_hex

    def known(self, path) -> str | None:
        """The BLAKE3 digest (hex) recorded for ``path`` in its current state, or None."""
        try:
            key = _key(os.stat(path))
        except OSError:
            return None
        with self._lock:
            return self._known.get(key)


def file_blake3(path, chunk_bytes: int = 8 * 2**20) -> str:
    """The BLAKE3 digest (hex) of a file as it is on disk, read in chunks (not memory-mapped: a
    mapping's touched pages would count in the process's RSS)."""
    import blake3

    h = blake3.blake3()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()
