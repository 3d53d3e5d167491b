"""``<out>.partial``, the staging directory of a checkpoint: which model bytes its ranks were made
from, and the digest of each finished rank, checked before a rerun keeps it.

* The fingerprint (``fingerprint.json``) holds the plan's structure (``sha256``: config, options,
  every rank's tensors and their slices of the source tensors) and the model's identity
  (``weights``: one BLAKE3 over its tensors' names, dtypes, shapes and digests,
  common.source_scan; the files that hold them are not part of it, so the same tensors
  re-sharded or saved again with other header metadata resume the same stage). A fresh
  stage records ``weights`` once the background scan has it (before the checkpoint is promoted,
  and when the run is interrupted); a rerun that finds a stage of the same structure waits for
  the digest of the weights it has now and keeps the finished ranks only when they match: weights
  replaced between two runs never mix in one checkpoint.
* Each rank's BLAKE3 (``.rank<r>.safetensors.blake3``) is written before the rank is renamed
  into place; a rerun hashes each finished rank and refuses (one line, exit 2) one that no longer
  matches it. A rank without its digest is written again.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.digests import file_blake3
from common.errors import UserError
from common.staged import StagedOutput

FINGERPRINT = "fingerprint.json"


def staged(out_dir: Path) -> StagedOutput:
    return StagedOutput(out_dir, record=FINGERPRINT)


def digest_file(rank_path: Path) -> Path:
    return rank_path.with_name(f".{rank_path.name}.blake3")


def stage_digest(rank_path: Path) -> str:
    """The digest kept beside a rank (written by :func:`seal_rank`)."""
    return digest_file(rank_path).read_text().strip()


def seal_rank(tmp: Path, path: Path, digests) -> str:
    """``tmp`` is complete (fsynced): write its digest beside it (the writer's, else hashed from
    disk), then rename it to ``path``; returns the digest."""
    hexd = (digests.known(tmp) if digests is not None else None) or file_blake3(tmp)
    side = digest_file(path)
    part = side.with_name(side.name + f".{os.getpid()}.tmp")
    part.write_text(hexd + "\n")
    os.replace(part, side)
    os.replace(tmp, path)
    if digests is not None:
        digests.record_path(path, hexd)
    return hexd


class Stage:
    """The staging directory of one conversion (see the module docstring)."""

    def __init__(self, out_dir: Path, structure: dict, scan, *, calibrated: bool, subset: bool,
                 force: bool):
        self.staged, self.scan = staged(out_dir), scan
        self.structure = structure
        old = self.staged.recorded() if self.staged.stage.exists() else None
        resumable = not calibrated and isinstance(old, dict) and \
            {k: old.get(k) for k in structure} == structure
        # a rerun (or another node's run) proves the weights are the same bytes before it keeps
        # anything; a fresh stage learns them in the background
        weights = scan.weights_digest() if subset or resumable else None
        self.weights = weights
        refuse = (f"{self.staged.stage} holds ranks converted from other inputs or options; "
                  f"rerun with the same ones, or pass --force to discard them") \
            if subset and not force else None
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            # never resume a calibrated run: calibration on a GPU is not bit-reproducible, and
            # ranks of two calibrations must not be mixed
            self.staged.open({**structure, "weights": weights}, resume=not calibrated,
                             refuse=refuse)
        except OSError as e:
            raise UserError(f"cannot write to {out_dir.parent}: {e.strerror or e}; "
                            f"choose another --output")
        self.dir = self.staged.stage

    def record_weights(self) -> None:
        """Write the weights' digest into the fingerprint (waits for the scan); a stage whose
        weights changed while it was written is refused."""
        weights = self.scan.weights_digest()
        if self.weights is not None and self.weights != weights:
            raise UserError(f"the model's weight files changed while {self.dir} was written; "
                            f"rerun once they stay the same")
        if self.weights is None:
            self.staged.write_record({**self.structure, "weights": weights})
            self.weights = weights

    def finished(self, rank: int, digests) -> bool:
        """Whether rank ``rank`` is in the stage, whole and as written: its bytes are hashed and
        compared with the digest recorded when it was written (a mismatch is refused)."""
        path = self.dir / f"rank{rank}.safetensors"
        if not path.is_file():
            return False
        side = digest_file(path)
        try:
            want = side.read_text().strip()
        except OSError:
            path.unlink(missing_ok=True)  # renamed before its digest was kept: write it again
            return False
        got = file_blake3(path)
        if got != want:
            raise UserError(f"{path} does not match the BLAKE3 digest recorded when it was "
                            f"written ({want[:16]}..., now {got[:16]}...): it was changed or "
                            f"damaged on disk; delete {self.dir} to convert every rank afresh")
        if digests is not None:
            digests.record_path(path, got)
        return True

    def before_promote(self, world: int) -> None:
        """The rank digests stay behind (the checkpoint is listed with its digests in build.json)."""
        for r in range(world):
            digest_file(self.dir / f"rank{r}.safetensors").unlink(missing_ok=True)
