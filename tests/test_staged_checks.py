"""Issue 29, class 6 and its fault suite: the quality gate and --verify run on the staged
checkpoint and only a passing one is put in place; a run killed (SIGKILL, as the OOM killer does)
during the gate or while the Triton repository is written ends in no new output or in complete,
checked outputs only, and the rerun writes the same bytes as an uninterrupted run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import ownership
from common.ownership import RECORD

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"
FP8 = ("--fp8", "--calib-size", "2", "--calib-seq-len", "32")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny random Llama with the golden matrix's committed tokenizer (1000 tokens)."""
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("model")
    make_tiny_model(d, vocab_size=1000)
    for f in (REPO / "tests" / "golden" / "tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    return d


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                         os.environ.get("PYTHONPATH", "")])}


def _killed_at(at: str, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "kill", at, *map(str, argv),
                           "--no-progress"], env=_env(), capture_output=True, text=True,
                          timeout=900)


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builders", *map(str, argv), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=900)


def _outputs(out: Path) -> dict:
    """Every output file's bytes (the output dir's own path written as @), but build.json and
    calibration.json (timings) and the ownership record (sizes of files that name the dir)."""
    got = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and p.name not in ("build.json", "calibration.json", RECORD):
            got[rel] = p.read_bytes().replace(str(out.resolve()).encode(), b"@")
    return got


def test_killed_during_the_gate_leaves_no_checkpoint_and_the_rerun_finishes_it(tmp_path, model):
    """Before: the gate ran after the checkpoint was in place, so a run killed during it left a
    complete-looking checkpoint/ that --from-checkpoint accepted."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _cli("--model", model, "--output", ref, *FP8).returncode == 3
    killed = _killed_at("gate", "--model", model, "--output", out, *FP8)
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "calibration", "checkpoint.partial"]  # no checkpoint/, no triton/, no build.json
    partial = _cli("--from-checkpoint", out / "checkpoint.partial", "--output", tmp_path / "e",
                   "--triton-target", "none")
    assert partial.returncode == 2
    assert partial.stderr.strip() == (
        f"build_engine: error: --from-checkpoint {out / 'checkpoint.partial'} is an unfinished "
        f"checkpoint (build_engine's staging directory: its writing or its checks did not "
        f"finish); rerun the build that writes it, then use its checkpoint/")
    rerun = _cli("--model", model, "--output", out, *FP8)
    assert rerun.returncode == 3, rerun.stderr
    assert "quality gate (FP8)" in rerun.stdout
    assert _outputs(out) == _outputs(ref)
    assert not (out / "checkpoint.partial").exists()
    assert ownership.is_finished(out / "checkpoint") and ownership.is_finished(out / "triton")


def test_killed_while_writing_triton_leaves_only_complete_outputs(tmp_path, model):
    """The checkpoint already in place is complete and checked; the repository's private stage
    is hidden and swept by the rerun, which gives the uninterrupted run's bytes."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _cli("--model", model, "--output", ref, "--force").returncode == 3  # as the rerun
    killed = _killed_at("triton", "--model", model, "--output", out)
    assert killed.returncode == -9, killed.stderr
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["checkpoint"] and ownership.is_finished(out / "checkpoint")
    (left,) = [p for p in out.iterdir() if p.name.startswith(".triton.")]
    assert left.name.endswith(".partial")  # hidden, never a complete-looking triton/
    rerun = _cli("--model", model, "--output", out, "--force")
    assert rerun.returncode == 3, rerun.stderr
    assert not left.exists()
    assert _outputs(out) == _outputs(ref)


def test_a_failed_verify_puts_nothing_in_place(tmp_path, model, monkeypatch, capsys):
    """--verify runs on the staged checkpoint: a mismatch (forced here by a TEST DOUBLE verdict)
    leaves the earlier output as it was, exit 1."""
    import builders.checks as checks
    from builders.cli import main

    out = tmp_path / "out"
    argv = ["--model", str(model), "--output", str(out), "--no-progress", "--triton-target",
            "none", "--checkpoint-only"]
    assert main(argv) == 0
    before = _outputs(out)
    real = checks.verify

    def mismatch(*a, **k):  # TEST DOUBLE: the real reader's report, judged a mismatch
        report, _ = real(*a, **k)
        return {**report, "passed": False}, False

    monkeypatch.setattr(checks, "verify", mismatch)
    assert main([*argv, "--verify", "--force", "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "the checkpoint was not put in place" in err
    assert {k: v for k, v in _outputs(out).items() if not k.startswith("checkpoint.partial")} \
        == before


# --- --target pytorch: the unified checkpoint is checked staged too --------------------------

PT_FP8 = ("--target", "pytorch", *FP8)


def _visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def test_pytorch_killed_during_the_gate_leaves_no_checkpoint_and_the_rerun_finishes_it(
        tmp_path, model):
    """Before: hf_quantized/ was in place (and triton/ written) before the gate ran, so a run
    killed during it left a complete-looking checkpoint that no gate had passed."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _cli("--model", model, "--output", ref, *PT_FP8).returncode == 0
    killed = _killed_at("gate", "--model", model, "--output", out, *PT_FP8)
    assert killed.returncode == -9, killed.stderr
    assert _visible(out) == ["hf_quantized.partial"]  # no hf_quantized/, triton/, build.json
    rerun = _cli("--model", model, "--output", out, *PT_FP8)
    assert rerun.returncode == 0, rerun.stderr
    assert "quality gate (FP8)" in rerun.stdout
    assert _outputs(out) == _outputs(ref) and _visible(out) == _visible(ref)
    assert ownership.is_finished(out / "hf_quantized") and ownership.is_finished(out / "triton")


def _pytorch_run_then(tmp_path, model, monkeypatch, capsys, name, double, *flags):
    """An earlier --target pytorch output; then a --force run whose check ``name`` of
    builders.checks is replaced by ``double``; (its exit status, stderr, the earlier files)."""
    import builders.checks as checks
    from builders.cli import main

    out = tmp_path / "out"
    argv = ["--model", str(model), "--output", str(out), "--no-progress", *PT_FP8]
    assert main(argv) == 0
    before = _outputs(out)
    monkeypatch.setattr(checks, name, double(getattr(checks, name)))
    capsys.readouterr()
    rc = main([*argv, "--force", *flags])
    return rc, capsys.readouterr().err, before


def test_pytorch_gate_breach_keeps_the_earlier_output(tmp_path, model, monkeypatch, capsys):
    """Before: the failed gate's checkpoint had already replaced the earlier hf_quantized/, and
    the breach removed both, with the earlier triton/ and build.json."""
    def breach(real):  # TEST DOUBLE: the real gate's measurement, judged a breach of the limit
        return lambda *a, **k: {**real(*a, **k), "passed": False}

    rc, err, before = _pytorch_run_then(tmp_path, model, monkeypatch, capsys, "quality_gate",
                                        breach, "--max-ppl-increase", "1")
    out = tmp_path / "out"
    assert rc == 1 and "the quality gate failed" in err, err
    assert _outputs(out) == before and _visible(out) == ["build.json", "hf_quantized", "triton"]
    assert ownership.is_finished(out / "hf_quantized")


def test_pytorch_failed_verify_puts_nothing_in_place(tmp_path, model, monkeypatch, capsys):
    """--verify runs on hf_quantized.partial: a mismatch leaves the earlier output as it was and
    keeps the stage for a look, exit 1."""
    def mismatch(real):  # TEST DOUBLE: the real reader's report, judged a mismatch
        return lambda *a, **k: ({**real(*a, **k)[0], "passed": False}, False)

    rc, err, before = _pytorch_run_then(tmp_path, model, monkeypatch, capsys, "verify",
                                        mismatch, "--verify")
    out = tmp_path / "out"
    assert rc == 1
    assert (f"the checkpoint was not put in place; it is kept in {out / 'hf_quantized.partial'} "
            f"for a look") in err, err
    assert {k: v for k, v in _outputs(out).items()
            if not k.startswith("hf_quantized.partial/")} == before
    assert (out / "hf_quantized.partial" / "model.safetensors").is_file()


# --- the engine stage: killed while building, and after the engines before Triton -------------

ENGINES = ("--tp", "2", "--build-workers", "1")  # rank 0 finished before rank 1 starts


def _engine_env(tmp_path) -> dict:
    """The stand-in tensorrt_llm (TEST DOUBLE, tests/trtllm_api_doubles.py) on the workers' path."""
    from trtllm_api_doubles import PYDANTIC_1_2, write_package

    site = write_package(tmp_path / "fake_site", PYDANTIC_1_2)
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(site)])
    env["FAKE_TRTLLM_RECORD"] = str(record)
    for k in ("FAKE_TRTLLM_FAIL", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    return env


def _at(action: str, at: str, env: dict, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), action, at, *map(str, argv),
                           "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("at,left", [("engine-rank1", ["checkpoint", "engines.partial"]),
                                     ("after-engines", ["checkpoint", "engines"])])
def test_killed_at_the_engine_stage_and_the_rerun_gives_the_same_bytes(tmp_path, model, at,
                                                                       left):
    """Issue 29 "kill at every stage boundary", the engine stage: killed after rank 0's engine and
    before rank 1's, no engines/ (rank 0 only in the run's private directory, never adopted);
    killed after the engines, before the Triton repository: checkpoint/ and engines/ complete and
    no triton/ or build.json. Either way the rerun (--force: checkpoint/ is in place) writes the
    uninterrupted run's bytes. Engines by the TEST DOUBLE stand-in tensorrt_llm."""
    env = _engine_env(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    done = _at("none", at, env, "--model", model, "--output", ref, *ENGINES, "--force")
    assert done.returncode == 0, done.stderr
    killed = _at("kill", at, env, "--model", model, "--output", out, *ENGINES)
    assert killed.returncode == -9, killed.stderr
    assert _visible(out) == left
    assert ownership.is_finished(out / "checkpoint")
    if at == "engine-rank1":
        stage = out / "engines.partial"
        assert not list(stage.glob("rank*.engine"))  # nothing landed in the shared stage
        assert [p.name for p in stage.glob(".run-*/rank*.engine")] == ["rank0.engine"]
    else:
        assert ownership.is_finished(out / "engines")
    rerun = _at("none", at, env, "--model", model, "--output", out, *ENGINES, "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert _visible(out) == _visible(ref) == ["build.json", "checkpoint", "engines", "triton"]
    # the build logs name the run's private directory (its pid): not the run's product
    got, want = ({k: v for k, v in _outputs(d).items() if not k.startswith("engines/logs/")}
                 for d in (out, ref))
    assert sorted(got) == sorted(want) and [k for k in got if got[k] != want[k]] == []
