"""Putting a finished output directory or file in place: a reader sees the old one or the new one,
never half of either."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import naming


def swap_into_place(new: Path, dest: Path) -> None:
    """Rename the complete directory ``new`` to ``dest``. An existing ``dest`` (the caller checked
    ``--force``) is first renamed aside to ``dest.old`` and removed only once ``new`` is in place."""
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path, text: str, *, executable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole: under a temporary name beside it, renamed when
    written. A failed write leaves no file behind (not even the temporary one) and raises its
    OSError naming ``path`` (common.errors.naming)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with naming(path):
        try:
            tmp.write_text(text, encoding="utf-8")
            if executable:
                tmp.chmod(tmp.stat().st_mode | 0o111)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
