"""Putting a finished output directory in place: a reader sees the old one or the new one, never
half of either."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


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
