"""What build_engine may delete or replace: only a directory it wrote itself and can prove it.

Every directory the tool writes carries one hidden marker, ``.build_engine.json``:

* a **stage** (``checkpoint.partial``, ``engines.partial``, a calibration store, a private
  ``.triton.XXXX.partial``) gets ``{"written_by": "build_engine", "stage": true}`` when the tool
  creates it: everything in it is the tool's work in progress;
* a **finished output** (``checkpoint/``, ``engines/``, ``triton/``, ``hf_quantized/``) gets, as it
  is promoted, the list of every file it holds with its size and BLAKE3 digest.

A directory is the tool's (``foreign`` returns None) when it has a stage marker, or a finished
marker that lists exactly the files it holds at the sizes written. Anything else (no marker, a
file the marker does not list, a file whose size changed, a symlink, a plain file) is someone
else's, and the tool refuses to delete or replace it (``refuse_foreign``: one line naming the path
and the fix). Sizes, not digests, are compared before a replace: re-hashing a multi-GB checkpoint
only to delete it would cost minutes; the digests are there for read-back checks.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common.errors import UserError

MARKER = ".build_engine.json"
WRITTEN_BY = "build_engine"
_CHUNK = 8 * 2**20


def _blake3(path: Path, digests=None) -> str:
    """The file's BLAKE3 (hex): the run's writer digest when it has one, else read and hashed
    (and told to ``digests``, so build.json does not hash it again)."""
    known = digests.known(path) if digests is not None else None
    if known:
        return known
    import blake3

    h = blake3.blake3()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(view):
            h.update(view[:n])
        hexed = h.hexdigest()
        if digests is not None:
            digests.record(f.fileno(), hexed)
    return hexed


def _files(root: Path) -> dict[str, Path]:
    """Every file (or link) under ``root`` but the marker, by relative POSIX path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(root).as_posix()
        if rel != MARKER:
            out[rel] = p
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def mark_stage(root: Path) -> None:
    """``root`` (just created by the tool) is a stage of the tool's."""
    _write_json(Path(root) / MARKER, {"written_by": WRITTEN_BY, "stage": True})


def mark_finished(root: Path, digests=None, exclude: tuple[str, ...] = ()) -> None:
    """``root`` is a finished output of the tool's: record every file in it (but ``exclude``)
    with its size and BLAKE3 digest."""
    files = {rel: {"size": p.lstat().st_size, "blake3": _blake3(p, digests)}
             for rel, p in _files(Path(root)).items()
             if rel not in exclude and not p.is_symlink()}
    _write_json(Path(root) / MARKER, {"written_by": WRITTEN_BY, "files": files})


def read_marker(root: Path) -> dict | None:
    try:
        data = json.loads((Path(root) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == WRITTEN_BY else None


def is_finished(root: Path) -> bool:
    """``root`` holds the tool's finished-output marker (written when it was put in place)."""
    data = read_marker(root)
    return data is not None and isinstance(data.get("files"), dict)


def foreign(path) -> str | None:
    """Why ``path`` is not provably the tool's own (None when it is, or when it does not
    exist); the reason names the path."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_dir():
        return f"{path} is not a directory build_engine wrote"
    data = read_marker(path)
    if data is None:
        return f"{path} was not written by build_engine (it has no {MARKER})"
    if data.get("stage") is True:
        return None
    listed = data.get("files")
    if not isinstance(listed, dict):
        return f"{path} has a {MARKER} that lists no files"
    for rel, p in _files(path).items():
        want = listed.get(rel)
        if want is None or p.is_symlink():
            return f"{path / rel} was not written by build_engine"
        if not isinstance(want, dict) or p.lstat().st_size != want.get("size"):
            return f"{path / rel} changed since build_engine wrote it"
    return None


def refuse_foreign(path, doing: str = "replace") -> None:
    """UserError (one line, exit 2) unless ``path`` is the tool's own or absent."""
    why = foreign(path)
    if why is not None:
        raise UserError(f"{why}: build_engine will not {doing} it; move it out of the way (or "
                        f"remove it yourself) or choose another --output")


def remove_owned(path) -> bool:
    """Remove the tool's own ``path`` (refused, one line, when it is not provably its own);
    whether there was something to remove."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    refuse_foreign(path, "delete")
    shutil.rmtree(path)
    return True


def inside(path, container) -> bool:
    """``path`` is ``container`` or lies under it (both resolved)."""
    p, c = Path(path).resolve(), Path(container).resolve()
    return p == c or c in p.parents
