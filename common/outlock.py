"""One lock on the output directory for the whole run: ``OUTPUT/.build_engine.lock``.

``fcntl.flock`` on a file kept open: the kernel drops it when the process ends, however it ends
(kill -9 included), so a lock left by a dead process never blocks. A run that writes the whole
output takes it exclusively; the ``--ranks`` runs of one multi-node world take it shared (they are
made to write into one output side by side, see convert.convert and builders.engine_stage), which
still keeps a whole run out while any of them writes, and them out while a whole run writes. A
second run is refused before any work: ``another build_engine (pid N) is writing DIR`` (exit 2).

The last holder removes the file (and the output directory, if the lock was all it held) when
it is done. Because of that unlink, a run checks after locking that the file it locked is
still the one at the path (else it locked an unlinked file and tries again).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from common.errors import UserError

LOCK_NAME = ".build_engine.lock"


class OutputLock:
    """``with OutputLock(out, shared=False):`` the run's hold on ``out``; see the module."""

    def __init__(self, out, shared: bool = False):
        self.out, self.shared = Path(out), shared
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> "OutputLock":
        try:
            self._made_dir = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
                                | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _holder(fd)
                    os.close(fd)
                    raise UserError(f"another build_engine (pid {pid}) is writing {self.out}; "
                                    f"wait for it to finish or choose another --output") from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # locked a file its holder had just unlinked: take the new one
            else:
                raise UserError(f"cannot lock {self.path}: it keeps being replaced")
        except OSError as e:
            raise UserError(f"cannot write to {self.out}: {e.strerror or e}; "
                            f"choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self.shared:  # the last of the --ranks runs tidies up as an exclusive holder would
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
        if not self.shared or alone:  # no one else holds it: the file goes, and an output
            self.path.unlink(missing_ok=True)  # made only to hold it
            if self._made_dir:
                try:
                    self.out.rmdir()
                except OSError:
                    pass
        os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
