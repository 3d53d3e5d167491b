"""An output directory written beside its destination and put in place only when complete.

Every writer of the build (checkpoint, calibration store, engines, unified checkpoint, Triton
repository) follows one pattern, kept here once:

* **stage**: files are written into a staging directory (``<dest>.partial`` by default), so a
  reader never sees half an output;
* **fingerprint**: the stage records what it is being made from (a JSON record in the stage);
* **resume or refuse**: a later run of the same fingerprint keeps the finished parts; one of
  another fingerprint discards them, or is refused when they are other runs' work (``--ranks``);
* **promote**: the complete stage is renamed to the destination (an old one set aside first,
  removed once the new one is in place: a reader sees one or the other, never half);
* **discard**: after a failure, the stage or only this run's own files go.
* **own**: only what the tool wrote is ever deleted or replaced (common.ownership): a stage is
  entered in the output's record as the tool's when it is created, a finished output with the
  list of its files when it is promoted; a stage or destination that is not provably the
  tool's is refused in one line.

A stage equal to the destination (the calibration store) is a directory used in place: resumed
or restarted by its fingerprint, never promoted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from common.atomic import write_text
from common import ownership
from common.errors import UserError
from common.ownership import foreign, mark_finished, mark_stage, refuse_foreign


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
        mark_stage(stage)
        return cls(dest, stage=stage)

    @staticmethod
    def sweep(out_dir) -> list[Path]:
        """Remove what killed runs left in ``out_dir``: private stages and replaced outputs set
        aside (``.NAME.XXXX.partial`` / ``.NAME.XXXX.old``) that carry the tool's marker. Only
        under the output's exclusive lock (common.outlock): no other run is writing them."""
        gone = []
        out_dir = Path(out_dir)
        if not out_dir.is_dir():
            return gone
        for p in sorted(out_dir.iterdir()):
            if p.name.startswith(".") and p.name.endswith((".partial", ".old")) and \
                    p.is_dir() and not p.is_symlink() and \
                    ownership.entry(p) is not None and foreign(p) is None:
                shutil.rmtree(p, ignore_errors=True)
                ownership.forget(p)
                gone.append(p)
        return gone

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
        if os.path.lexists(self.stage):
            same = resume and self.recorded() == fingerprint
            if same:
                return True
            if resume and refuse is not None:
                raise UserError(refuse)
            refuse_foreign(self.stage, "delete")  # only the tool's own stage is discarded
            shutil.rmtree(self.stage)  # errors raised: a stage half removed must not be reused
            ownership.forget(self.stage)
        self.stage.mkdir(parents=True, exist_ok=True)
        mark_stage(self.stage)
        if fingerprint is not None or record is not None:  # None: written in one go, no record
            self.write_record(fingerprint if record is None else record)
        return False

    # --- promote or discard --------------------------------------------------------------------

    def promote(self, digests=None) -> None:
        """Put the complete stage in place of ``dest`` (an old one is replaced, if it is the
        tool's own: the caller checked ``--force``); the fingerprint record does not go with it,
        the marker listing every file goes in its place (``digests``: the run's writer digests,
        so files it wrote are not read again)."""
        if self.stage == self.dest:
            return
        refuse_foreign(self.dest)
        (self.stage / self.record).unlink(missing_ok=True)
        mark_finished(self.stage, digests)
        dest = self.dest
        if not os.path.lexists(dest):
            os.replace(self.stage, dest)
            ownership.moved(self.stage, dest)
            return
        # the old one aside under a fresh hidden name (never one a user may hold, like
        # NAME.old), entered as the tool's first so that a run killed here leaves nothing
        # unowned (the next run sweeps it)
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        ownership.copy_entry(dest, old)
        os.replace(dest, old)  # onto the empty directory mkdtemp made
        os.replace(self.stage, dest)
        ownership.moved(self.stage, dest)
        shutil.rmtree(old, ignore_errors=True)
        ownership.forget(old)

    def discard(self, own: Iterable | None = None) -> None:
        """After a failure: the whole stage, or with ``own`` (names or paths in the stage) only
        this run's files, since other runs may share the stage (``--ranks``). A stage that is
        not the tool's (no marker) is left alone."""
        if own is None:
            if os.path.lexists(self.stage) and foreign(self.stage) is None:
                shutil.rmtree(self.stage, ignore_errors=True)
                ownership.forget(self.stage)
            return
        for name in own:
            path = self.stage / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
