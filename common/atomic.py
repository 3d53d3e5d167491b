"""Putting a finished output directory in place: a reader sees the old one or the new one, never
half of either."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def swap_into_place(new: Path, dest: Path) -> None:
    """Rename the complete directory ``new`` to ``dest``. An existing ``dest`` (the caller checked
    ``--force`` and that it is the tool's own) is first renamed aside to a fresh hidden
    ``.NAME.XXXX.old`` (never a name a user may hold, such as ``NAME.old``) and removed only once
    ``new`` is in place; one left by a killed run is swept by the next (StagedOutput.sweep)."""
    new, dest = Path(new), Path(dest)
    if not os.path.lexists(dest):
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.replace(dest, old)  # onto the empty directory mkdtemp made
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
