"""What build_engine may delete or replace: only a directory it wrote itself and can prove it.

The proof is one hidden record per output directory, ``OUTPUT/.build_engine.json`` (beside the
outputs, never inside them: a checkpoint, an engine directory or a Triton repository holds only
what its reader expects), with an entry per directory the tool wrote there:

* a **stage** (``checkpoint.partial``, ``engines.partial``, a calibration store, a private
  ``.triton.XXXX.partial``) is entered as ``{"stage": true}`` when the tool creates it: what is
  in it is the tool's work in progress;
* a **finished output** (``checkpoint``, ``engines``, ``triton``, ``hf_quantized``) is entered,
  as it is promoted, with every file it holds, its size and BLAKE3 digest.

A directory is the tool's (``foreign`` returns None) when its entry is a stage, or lists exactly
the files it holds at the sizes written. Anything else (no entry, a file the entry does not
list, a file whose size changed, a symlink, a plain file) is someone else's, and the tool refuses
to delete or replace it (``refuse_foreign``: one line naming the path and the fix). Sizes, not
digests, are compared before a replace: re-hashing a multi-GB checkpoint only to delete it would
cost minutes; the digests are there for read-back checks (``damaged``: before
``--from-checkpoint`` uses a checkpoint). Runs that share an output (``--ranks``)
update the record under a lock on the directory.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from common.errors import UserError

RECORD = ".build_engine.json"
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
        view = memoryview(bytearray(_CHUNK))
        while n := f.readinto(view):
            h.update(view[:n])
        hexed = h.hexdigest()
        if digests is not None:
            digests.record(f.fileno(), hexed)
    return hexed


def _files(root: Path) -> dict[str, Path]:
    """Every file (or link) under ``root``, by relative POSIX path."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_symlink() or not p.is_dir()}


def _read(parent: Path) -> dict:
    try:
        data = json.loads((parent / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("written_by") == WRITTEN_BY
    return data.get("outputs", {}) if ok and isinstance(data.get("outputs"), dict) else {}


@contextlib.contextmanager
def _updating(parent: Path):
    """The parent's record for update, under an exclusive lock on the directory itself."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        outputs = _read(parent)
        yield outputs
        path = parent / RECORD
        if not outputs:
            path.unlink(missing_ok=True)
            return
        tmp = parent / f".{RECORD}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"written_by": WRITTEN_BY, "outputs": outputs},
                                  sort_keys=True, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        os.close(fd)


def _set(path: Path, entry: dict | None) -> None:
    path = Path(path)
    with _updating(path.parent) as outputs:
        if entry is None:
            outputs.pop(path.name, None)
        else:
            outputs[path.name] = entry


def mark_stage(path) -> None:
    """``path`` (just created by the tool) is a stage of the tool's."""
    _set(path, {"stage": True})


def mark_finished(path, digests=None, exclude: tuple[str, ...] = ()) -> None:
    """``path`` is a finished output of the tool's: record every file in it (but ``exclude``)
    with its size and BLAKE3 digest."""
    files = {rel: {"size": p.lstat().st_size, "blake3": _blake3(p, digests)}
             for rel, p in _files(Path(path)).items()
             if rel not in exclude and not p.is_symlink()}
    _set(path, {"files": files})


def moved(src, dest) -> None:
    """``src``'s entry now names ``dest`` (same parent), replacing dest's."""
    src, dest = Path(src), Path(dest)
    with _updating(src.parent) as outputs:
        entry = outputs.pop(src.name, None)
        if entry is None:
            outputs.pop(dest.name, None)
        else:
            outputs[dest.name] = entry


def copy_entry(src, dest) -> None:
    """``dest`` (same parent) gets ``src``'s entry too."""
    src, dest = Path(src), Path(dest)
    with _updating(src.parent) as outputs:
        if src.name in outputs:
            outputs[dest.name] = outputs[src.name]


def forget(path) -> None:
    """``path`` is gone (removed or never made)."""
    if Path(path).parent.is_dir():
        _set(path, None)


def entry(path) -> dict | None:
    """The record's entry for ``path``, or None."""
    path = Path(path)
    got = _read(path.parent).get(path.name)
    return got if isinstance(got, dict) else None


def is_finished(path) -> bool:
    """``path`` is a finished output the tool put in place and it is unchanged in name and size."""
    got = entry(path)
    return got is not None and isinstance(got.get("files"), dict) and foreign(path) is None


def foreign(path) -> str | None:
    """Why ``path`` is not provably the tool's own (None when it is, or when it does not
    exist); the reason names the path."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_dir():
        return f"{path} is not a directory build_engine wrote"
    got = entry(path)
    if got is None:
        return f"{path} was not written by build_engine (no entry in {path.parent / RECORD})"
    if got.get("stage") is True:
        return None
    listed = got.get("files")
    if not isinstance(listed, dict):
        return f"{path}: its entry in {path.parent / RECORD} lists no files"
    for rel, p in _files(path).items():
        want = listed.get(rel)
        if want is None or p.is_symlink():
            return f"{path / rel} was not written by build_engine"
        if not isinstance(want, dict) or p.lstat().st_size != want.get("size"):
            return f"{path / rel} changed since build_engine wrote it"
    return None


def damaged(path) -> str | None:
    """Why a finished output of the tool's no longer holds the bytes it was written with (a listed
    file missing, or not of its recorded BLAKE3), or None (also for a path with no finished
    entry). Every file is read: for an output about to be used again (``--from-checkpoint``),
    never before a replace or a delete."""
    path = Path(path)
    got = entry(path)
    listed = got.get("files") if got is not None else None
    if not isinstance(listed, dict):
        return None
    record = path.parent / RECORD
    for rel, want in sorted(listed.items()):
        p = path / rel
        if not p.is_file():
            return f"{p} is listed in {record} but missing"
        if not isinstance(want, dict) or _blake3(p) != want.get("blake3"):
            return (f"{p} does not match its BLAKE3 digest in {record}: it was changed or "
                    f"damaged after it was written")
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
    forget(path)
    return True


def inside(path, container) -> bool:
    """``path`` is ``container`` or lies under it (both resolved)."""
    p, c = Path(path).resolve(), Path(container).resolve()
    return p == c or c in p.parents
