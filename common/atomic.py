"""Writing a small file whole: a reader sees the old one or the new one, never half of either.
(Output directories are put in place by common.staged.StagedOutput.promote.)"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import naming


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
