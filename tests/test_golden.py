"""Same bytes: the golden matrix (tests/golden/matrix.py) reproduces every recorded output file.

The matrix covers float tp 1/2/4 and pp 2, bf16/fp32/sharded sources, --pad-heads, Qwen2 bias,
every calibrated format (the four SmoothQuant plugin variants, auto, --sq-recipe modelopt, FP8,
AWQ 64/128, weight-only, INT8/FP8 KV caches), the MoE layouts, --target pytorch formats,
--calibration reuse and both Triton repositories. It runs in a subprocess with the CPU kernels
pinned (matrix.PINNED_ENV), once per session (conftest.golden_matrix; tests/test_disk_plan.py
asserts the memory plan's disk figure on the same runs). A difference names the case and the
file; if an output is meant to change, re-record with ``python tests/golden/matrix.py --write``
under that environment and say why in the commit. Byte identity is asserted on the CPU kind the
manifest was recorded on; on another kind, calibrated files are compared by their numbers within
a tolerance (tests/golden/numeric.py: float32 forward passes differ in their low bits between CPU
kinds even with the kernels pinned).
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


def test_another_cpu_kind_compares_numbers_not_bytes(monkeypatch):
    """On the recording CPU kind a calibrated file must be byte-identical; on another kind its
    numeric summary (numeric.py) is compared within the tolerance instead, and a real change (a
    scale off by 10 %, a digest-free JSON number off by 10 %, a renamed tensor) still fails."""
    import numeric

    t = {"w": ["int8", [4, 4], 3.0, 40.0, 7.0, 11.0], "s": ["float32", [4], 1.0, 1.0, 0.5, 0.3]}
    want = {"inputs": {}, "recorded_on": "x86_64 / AuthenticAMD / AMD EPYC",
            "cases": {"c": {"exit": 0, "files": {"r.safetensors": "1", "b.json": "2", "t.pbtxt": "3"},
                            "numeric": {"r.safetensors": {"tensors": t},
                                        "b.json": {"json": {"ppl": 12.5, "f": "a" * 64, "n": 3}}}}}}

    def got(scale=1.0, ppl=12.5, name="s", pbtxt="3"):
        s = dict(t)
        s[name] = ["float32", [4], 1.0, 1.0 * scale, 0.5 * scale, 0.3]
        if name != "s":
            del s["s"]
        return {"inputs": {}, "cases": {"c": {"exit": 0, "files": {
            "r.safetensors": "9", "b.json": "8", "t.pbtxt": pbtxt}, "numeric": {
            "r.safetensors": {"tensors": s},
            "b.json": {"json": {"ppl": ppl, "f": "b" * 64, "n": 3}}}}}}

    monkeypatch.setattr(numeric, "cpu_kind", lambda: "x86_64 / GenuineIntel / Intel(R) Xeon(R)")
    notes = []
    assert compare(got(scale=1.0001, ppl=12.51), want, notes) == []
    assert notes == ["c: b.json", "c: r.safetensors"]
    assert compare(got(scale=1.1), want)[0].startswith(
        "cases c: r.safetensors: different bytes (beyond another CPU's tolerance: s: moments")
    assert compare(got(ppl=13.8), want) == [
        "cases c: b.json: different bytes (beyond another CPU's tolerance: /ppl: 13.8 vs 12.5)"]
    assert "tensor names" in compare(got(name="q"), want)[0]
    assert compare(got(pbtxt="7"), want) == ["cases c: t.pbtxt: different bytes"]
    # on the recording kind: bytes, whatever the numbers say
    monkeypatch.setattr(numeric, "cpu_kind", lambda: "x86_64 / AuthenticAMD / AMD EPYC")
    assert compare(got(), want) == ["cases c: b.json: different bytes",
                                    "cases c: r.safetensors: different bytes"]
