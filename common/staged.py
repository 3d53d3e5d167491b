"""An output directory written beside its destination and put in place only when complete.

Every writer of the build (checkpoint, calibration store, engines, unified checkpoint, Triton
repository) follows one pattern, kept here once:

* **stage**: files are written into a staging directory (``<dest>.partial`` by default), so a
  reader never sees half an output;
* **fingerprint**: the stage records what it is being made from (a JSON record in the stage);
* **resume or refuse**: a later run of the same fingerprint keeps the finished parts; one of
  another fingerprint discards them, or is refused when they are other runs' work (``--ranks``);
* **promote**: the complete stage is renamed to the destination (common.atomic.swap_into_place);
* **discard**: after a failure, the stage or only this run's own files go.

A stage equal to the destination (the calibration store) is a directory used in place: resumed
or restarted by its fingerprint, never promoted.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from common.atomic import swap_into_place, write_text
from common.errors import UserError


def _compact(data) -> str:
    return json.dumps(data)


class StagedOutput:
    """``dest`` written in ``stage``, its fingerprint in ``stage / record``.

    ``keys``: the fingerprint is these keys of the record (a manifest that holds more, e.g. the
    calibration store's ``calibration.json``); default the whole record. ``dump``: how the record
    is serialised (each writer's files keep their bytes)."""

    def __init__(self, dest, *, stage=None, record: str = ".fingerprint.json",
                 keys: tuple[str, ...] | None = None, dump: Callable[[object], str] = _compact):
        self.dest = Path(dest)
        self.stage = Path(stage) if stage is not None else \
            self.dest.with_name(self.dest.name + ".partial")
        self.record, self.keys, self.dump = record, keys, dump

    @classmethod
    def private(cls, dest) -> "StagedOutput":
        """A fresh stage of this run's own beside ``dest`` (``.<name>.XXXX.partial``): nothing to
        resume, and concurrent runs never share it. Readable by others (a server run as another
        user reads what is promoted)."""
        dest = Path(dest)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial",
                                      dir=dest.parent))
        stage.chmod(0o755)  # mkdtemp's 0700 would hide it once promoted
        return cls(dest, stage=stage)

    # --- fingerprint ---------------------------------------------------------------------------

    def read_record(self):
        """The stage's record as parsed JSON, or None (no stage, no record, unreadable)."""
        try:
            return json.loads((self.stage / self.record).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def recorded(self):
        """The fingerprint the stage holds, or None."""
        data = self.read_record()
        if self.keys is None or data is None:
            return data
        return {k: data.get(k) for k in self.keys} if isinstance(data, dict) else None

    def write_record(self, data) -> None:
        """Write the record whole under a temporary name (runs sharing the stage write the same)."""
        write_text(self.stage / self.record, self.dump(data))

    # --- resume or refuse ----------------------------------------------------------------------

    def open(self, fingerprint, *, resume: bool = True, refuse: str | None = None,
             record=None) -> bool:
        """Make the stage ready for a run of ``fingerprint``; return whether it was resumed.

        An existing stage is kept when ``resume`` and it holds ``fingerprint``. Otherwise it is
        discarded, except that one holding another fingerprint is refused with ``refuse`` (a
        UserError) when that is given. The record written is ``record`` (default: the
        fingerprint itself; none for a ``None`` fingerprint); a resumed stage keeps its record."""
        if self.stage.exists():
            same = resume and self.recorded() == fingerprint
            if same:
                return True
            if resume and refuse is not None:
                raise UserError(refuse)
            shutil.rmtree(self.stage)  # errors raised: a stage half removed must not be reused
        self.stage.mkdir(parents=True, exist_ok=True)
        if fingerprint is not None or record is not None:  # None: written in one go, no record
            self.write_record(fingerprint if record is None else record)
        return False

    # --- promote or discard --------------------------------------------------------------------

    def promote(self) -> None:
        """Put the complete stage in place of ``dest`` (an old one is replaced: the caller
        checked ``--force``); the fingerprint record does not go with it."""
        if self.stage == self.dest:
            return
        (self.stage / self.record).unlink(missing_ok=True)
        swap_into_place(self.stage, self.dest)

    def discard(self, own: Iterable | None = None) -> None:
        """After a failure: the whole stage, or with ``own`` (names or paths in the stage) only
        this run's files, since other runs may share the stage (``--ranks``)."""
        if own is None:
            if self.stage.is_symlink() or self.stage.is_file():
                self.stage.unlink()
            else:
                shutil.rmtree(self.stage, ignore_errors=True)
            return
        for name in own:
            path = self.stage / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
