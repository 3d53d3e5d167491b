"""Same bytes: the golden matrix (tests/golden/matrix.py) reproduces every recorded output file.

The matrix covers float tp 1/2/4 and pp 2, bf16/fp32/sharded sources, --pad-heads, Qwen2 bias,
every calibrated format (the four SmoothQuant plugin variants, auto, --sq-recipe modelopt, FP8,
AWQ 64/128, weight-only, INT8/FP8 KV caches), the MoE layouts, --target pytorch formats,
--calibration reuse and both Triton repositories. It runs in a subprocess with the CPU kernels
pinned (matrix.PINNED_ENV), once per session (conftest.golden_matrix; tests/test_disk_plan.py
asserts the memory plan's disk figure on the same runs). A difference names the case and the
file; if an output is meant to change, re-record with ``python tests/golden/matrix.py --write``
under that environment and say why in the commit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from matrix import CASES, compare  # noqa: E402


@pytest.mark.slow
def test_golden_matrix_same_bytes(golden_matrix):
    proc, _ = golden_matrix
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert f"same bytes: {len(CASES)} cases" in proc.stdout


def test_compare_names_each_difference():
    """The comparison itself: a changed, a missing and a new file, and a changed exit status."""
    want = {"inputs": {"m": {"config.json": "a"}},
            "cases": {"c": {"exit": 0, "files": {"x": "1", "y": "2"}}}}
    got = {"inputs": {"m": {"config.json": "b"}},
           "cases": {"c": {"exit": 3, "files": {"x": "9", "z": "3"}}}}
    assert compare(want, want) == []
    assert compare(got, want) == [
        "inputs m: config.json: different bytes",
        "case c: exit 3, recorded 0",
        "cases c: x: different bytes",
        "cases c: y: missing",
        "cases c: z: new",
    ]
