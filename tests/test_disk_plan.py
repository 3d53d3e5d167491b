"""Issue 29's weak spot: the memory plan's disk figure (quantize/memory.py) against the bytes a run
really puts under its output directory at the most (files written, then removed: the calibration
layers' inputs, a temporary calibration store, a staging directory beside an old output), on a
representative subset of the golden matrix's cases (tests/golden/matrix.py): never under, at most
10 % over. The figure printed is rounded up.

The peak is taken by the TEST DOUBLE ``DiskPeak``: before every rename and removal (the only
moments the tree can shrink) and at the end, the size of every file under the output directory."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest

from builders.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import matrix  # noqa: E402

#: float (padded heads, Qwen2 biases, a Triton repository), the calibration store with its layer
#: inputs (plugin SmoothQuant, FP8, AWQ), mixture of experts, and the PyTorch target's temporary
#: store
CASES = ("float-pad-heads", "float-qwen2-bias", "float-tp2-triton", "sq-default-triton",
         "fp8", "awq128", "moe-tp2", "moe-fp8", "pytorch-fp8", "pytorch-float-triton")


class DiskPeak:
    """TEST DOUBLE (a spy): the largest total size of the files under ``root``, measured before
    each ``os.replace`` / ``os.rename`` / ``os.unlink`` / ``os.remove`` / ``os.rmdir``."""

    def __init__(self, monkeypatch, root: Path):
        self.root, self.peak = root, 0
        for name in ("replace", "rename", "unlink", "remove", "rmdir"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._measuring(real))

    def _measuring(self, real):
        def call(*args, **kw):
            self.measure()
            return real(*args, **kw)
        return call

    def measure(self) -> int:
        if self.root.exists():
            size = sum(p.stat().st_size for p in self.root.rglob("*")
                       if p.is_file() and not p.is_symlink())
            self.peak = max(self.peak, size)
        return self.peak


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The golden matrix's input models these cases use, each with the committed tokenizer."""
    import torch

    from examples.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name in sorted({matrix.CASES[c][0] for c in CASES}):
        spec = dict(matrix.INPUTS[name])
        dtype = getattr(torch, spec.pop("dtype", "float32"))
        make_tiny_model(root / name, dtype=dtype, **spec)
        for f in matrix.TOKENIZER.iterdir():
            shutil.copy(f, root / name / f.name)
        dirs[name] = root / name
    return dirs


@pytest.mark.parametrize("case", CASES)
def test_disk_plan_covers_the_bytes_written(case, models, tmp_path, monkeypatch):
    import quantize.memory as memory

    model, argv = matrix.CASES[case]
    planned = []
    real_check = memory.check
    monkeypatch.setattr(memory, "check", lambda stages, out, device: (
        planned.append(sum(s.disk for s in stages)), real_check(stages, out, device))[1])
    out = tmp_path / "out"
    peak = DiskPeak(monkeypatch, out)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(["--model", str(models[model]), "--output", str(out), "--no-progress", *argv])
    assert rc in (0, 3), buf.getvalue()
    written = peak.measure()
    (estimate,) = planned
    assert written <= estimate <= 1.10 * written, (estimate, written, estimate / written)


def test_printed_disk_figure_is_rounded_up():
    from quantize.memory import GB, Stage, describe

    assert describe([Stage("checkpoint", 0.0, 0.0, 0.101 * GB)]).endswith("disk 0.11 GB")
    assert describe([Stage("checkpoint", 0.0, 0.0, 0.11 * GB)]).endswith("disk 0.11 GB")
