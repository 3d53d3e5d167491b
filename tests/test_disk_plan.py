"""Issue 29's weak spot: the memory plan's disk figure (quantize/memory.py) against the bytes a run
really puts under its output directory at the most (files written, then removed: the calibration
layers' inputs, a temporary calibration store, a staging directory beside an old output), on every
case of the golden matrix (tests/golden/matrix.py): never under, at most 10 % over. The figure
printed is rounded up.

The runs are the golden matrix's own (conftest.golden_matrix: one subprocess per session, shared
with tests/test_golden.py), so covering all of its cases costs no run of its own. Each case
records the plan's figure (the TEST DOUBLE ``matrix.planned_disk``, a spy on
``quantize.memory.check``) and the peak (the TEST DOUBLE ``matrix.DiskPeak``: before every rename
and removal, the only moments the tree can shrink, and at the end, the size of every file under
the output directory). One cheap case also runs here in-process, outside the slow suite."""
from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

import pytest

from builders.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import matrix  # noqa: E402


def within_plan(planned: list, peak: int) -> None:
    """One plan per run; its figure covers the peak, and by at most 10 %."""
    (estimate,) = planned
    assert peak <= estimate <= 1.10 * peak, (estimate, peak, estimate / peak)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(matrix.CASES))
def test_disk_plan_covers_the_bytes_written(case, golden_matrix):
    proc, result = golden_matrix
    assert result is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    disk = result["cases"][case]["disk"]
    within_plan(disk["planned"], disk["peak"])


def test_disk_plan_in_process(tmp_path):
    """The same measurement outside the matrix's subprocess (a float run with a Triton
    repository), so that the fast suite keeps one."""
    import torch

    from examples.tiny import make_tiny_model

    model, argv = matrix.CASES["float-tp2-triton"]
    spec = dict(matrix.INPUTS[model])
    hf = tmp_path / "hf"
    make_tiny_model(hf, dtype=getattr(torch, spec.pop("dtype", "float32")), **spec)
    for f in matrix.TOKENIZER.iterdir():
        shutil.copy(f, hf / f.name)
    out = tmp_path / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
            matrix.planned_disk() as planned, matrix.DiskPeak(out) as peak:
        rc = main(["--model", str(hf), "--output", str(out), "--no-progress", *argv])
    assert rc in (0, 3), buf.getvalue()
    assert peak.peak > 0
    within_plan(planned, peak.peak)


def test_printed_disk_figure_is_rounded_up():
    from quantize.memory import GB, Stage, describe

    assert describe([Stage("checkpoint", 0.0, 0.0, 0.101 * GB)]).endswith("disk 0.11 GB")
    assert describe([Stage("checkpoint", 0.0, 0.0, 0.11 * GB)]).endswith("disk 0.11 GB")
