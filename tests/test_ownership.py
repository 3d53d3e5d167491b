"""Issue 29, classes 3, 4, 5 and 7: build_engine deletes or replaces only what it wrote itself
(common.ownership), never adopts outputs it did not build, holds one lock on OUTPUT for the run
(common.outlock), and refuses every bad option in the plan. Each test failed on the code before
the fix (the reproduction is named in it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import builders.engine as E
from builders.cli import main
from common.ownership import RECORD
from engine_fakes import TwoGpus

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"


class NoTrtllmHere(E.TrtllmBackend):
    """TEST DOUBLE: the real backend, told TensorRT-LLM is not installed here."""

    def version(self):
        return None

    def import_error(self):
        return "No module named 'tensorrt_llm'"


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([*map(str, argv), "--no-progress"])
    err = capsys.readouterr().err
    return rc, err


def _error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("build_engine: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _listed(out: Path) -> list[str]:
    return [f["path"] for f in json.loads((out / "build.json").read_text())["outputs"]["files"]]


FLOAT = ("--triton-target", "none")


# --- class 3: it deletes only what it wrote ----------------------------------------------------

@pytest.mark.parametrize("name", ["checkpoint.partial", "engines.partial"])
@pytest.mark.parametrize("force", [False, True])
def test_a_users_directory_where_a_stage_goes_is_refused_not_deleted(
        tmp_path, tiny_model, capsys, name, force):
    """Before: a user's OUTPUT/checkpoint.partial was removed (staged.open rmtree'd it)."""
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / name / "mine.txt").write_text("keep me")
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT,
                   *(["--force"] if force else []))
    assert rc == 2
    assert _error(err) == (
        f"build_engine: error: {out / name} was not written by build_engine (no entry in "
        f"{out / RECORD}): build_engine will not delete it; move it out of the way (or remove "
        f"it yourself) or choose another --output")
    assert _tree(out) == {f"{name}/mine.txt": b"keep me"}  # nothing else written


def test_a_users_calibration_directory_is_refused_before_calibrating(tmp_path, capsys):
    """Before: a calibrated run reset a user's OUTPUT/calibration/ (the store's fingerprint did
    not match, so it was emptied)."""
    hf_dir = _tiny_with_tokenizer(tmp_path)
    out = tmp_path / "out"
    (out / "calibration").mkdir(parents=True)
    (out / "calibration" / "notes.txt").write_text("mine")
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, "--fp8", *FLOAT, "--force")
    assert rc == 2 and "calibration was not written by build_engine" in _error(err)
    assert _tree(out) == {"calibration/notes.txt": b"mine"}


def test_force_replaces_only_owned_outputs(tmp_path, tiny_model, capsys):
    """Before: --force removed OUTPUT/checkpoint.old (a user's) and foreign files inside
    checkpoint/, and build.json listed a user's notes.txt as this build's output."""
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    assert _run(capsys, "--model", hf_dir, "--output", out, *FLOAT)[0] == 3
    (out / "checkpoint.old").mkdir()
    (out / "checkpoint.old" / "u.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    first = _tree(out / "checkpoint")
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT, "--force", "--dtype",
                   "float32")
    assert rc == 3, err
    assert (out / "checkpoint.old" / "u.txt").read_text() == "mine"
    assert (out / "notes.txt").read_text() == "mine"
    assert _tree(out / "checkpoint") != first  # replaced: float32 now
    assert _listed(out) == ["checkpoint/config.json", "checkpoint/rank0.safetensors"]
    assert not [p for p in out.iterdir() if p.name.endswith(".old") and p.name.startswith(".")]

    (out / "checkpoint" / "foreign.txt").write_text("mine")
    before = _tree(out)
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT, "--force")
    assert rc == 2
    assert _error(err) == (
        f"build_engine: error: {out / 'checkpoint' / 'foreign.txt'} was not written by "
        f"build_engine: build_engine will not replace it; move it out of the way (or remove it "
        f"yourself) or choose another --output")
    assert _tree(out) == before


def test_a_foreign_file_in_the_triton_repository_is_not_replaced(tmp_path, capsys):
    """Before: --force removed files a user had added to triton/ along with the repository."""
    hf_dir = _tiny_with_tokenizer(tmp_path)
    out = tmp_path / "out"
    assert _run(capsys, "--model", hf_dir, "--output", out)[0] == 3
    (out / "triton" / "ensemble" / "my_notes.txt").write_text("mine")
    before = _tree(out)
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, "--force")
    assert rc == 2 and _error(err).startswith(
        f"build_engine: error: {out / 'triton' / 'ensemble' / 'my_notes.txt'} was not written "
        f"by build_engine: build_engine will not replace it")
    assert _tree(out) == before


def test_the_model_under_the_path_being_replaced_is_refused(tmp_path, tiny_model, capsys):
    """Before: --model OUTPUT/checkpoint --force replaced the input model by its conversion."""
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    model = out / "checkpoint"
    model.parent.mkdir()
    os.rename(hf_dir, model)
    before = _tree(model)
    rc, err = _run(capsys, "--model", model, "--output", out, *FLOAT, "--force")
    assert rc == 2
    assert _error(err) == (f"build_engine: error: --model {model} lies inside {model}, which "
                           f"this run replaces or deletes: choose another --output (or move "
                           f"the input)")
    assert _tree(model) == before and sorted(p.name for p in out.iterdir()) == ["checkpoint"]


# --- class 4: nothing stale is adopted ---------------------------------------------------------

def test_force_does_not_adopt_older_engines(tmp_path, tiny_model, fake_trtllm, monkeypatch,
                                            capsys):
    """Before: a --force run without TensorRT-LLM kept the older engines/, hashed them into the
    new build.json, and its launch_triton.sh served them."""
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    monkeypatch.setattr(E, "TrtllmBackend", TwoGpus)
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT)
    assert rc == 0, err
    assert (out / "engines" / "rank0.engine").is_file()
    monkeypatch.setattr(E, "TrtllmBackend", NoTrtllmHere)
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT, "--force", "--dtype",
                   "float32")
    assert rc == 3, err
    assert not (out / "engines").exists()
    assert not any(p.startswith("engines") for p in _listed(out))
    assert "engines" not in json.loads((out / RECORD).read_text())["outputs"]
    # an existing engines/ without --force: refused before any work (it would be adopted)
    (out / "checkpoint").rename(tmp_path / "elsewhere")
    (out / "engines").mkdir()
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT)
    assert rc == 2 and _error(err) == (
        f"build_engine: error: {out / 'engines'} already exists: choose another --output or "
        f"pass --force to replace it")
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT, "--checkpoint-only",
                   "--force")  # a new checkpoint would make it stale, and it is not the tool's
    assert rc == 2 and f"{out / 'engines'} was not written by build_engine" in _error(err)


# --- class 5: one run at a time per output -----------------------------------------------------

def _paused(tmp_path, argv) -> tuple[subprocess.Popen, Path]:
    """A build_engine process paused at the start of its steps, the output lock held."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "FAULT_READY": str(ready), "FAULT_GO": str(go),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(RUNNER), "pause", "run", *map(str, argv),
                             "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, go


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builders", *map(str, argv), "--no-progress"],
                          capture_output=True, text=True, timeout=600)


def test_a_second_run_into_the_same_output_is_refused(tmp_path, tiny_model):
    """Before: two runs into one output both exited 0, the later replacing the earlier's
    checkpoint without --force. Two real processes."""
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    argv = ["--model", hf_dir, "--output", out, *FLOAT]
    first, go = _paused(tmp_path, argv)
    try:
        second = _cli(*argv, "--force")
        assert second.returncode == 2
        assert _error(second.stderr) == (
            f"build_engine: error: another build_engine (pid {first.pid}) is writing {out}; "
            f"wait for it to finish or choose another --output")
        assert sorted(p.name for p in out.iterdir()) == [".build_engine.lock"]
    finally:
        go.touch()
        first.communicate(timeout=600)
    assert first.returncode == 3
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "build.json", "checkpoint"]


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, tiny_model):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    argv = ["--model", hf_dir, "--output", out, *FLOAT]
    first, _go = _paused(tmp_path, argv)
    first.kill()  # SIGKILL: no cleanup, the lock file stays
    first.communicate(timeout=60)
    assert (out / ".build_engine.lock").is_file()
    done = _cli(*argv)
    assert done.returncode == 3, done.stderr
    assert not (out / ".build_engine.lock").exists()


# --- class 7: every refusal in the plan --------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--max-batch-size", "0"], "--max-batch-size must be a whole number >= 1 (got 0)"),
    (["--max-seq-len", "-1"], "--max-seq-len must be a whole number >= 1 (got -1)"),
    (["--max-beam-width", "0", "--checkpoint-only"],
     "--max-beam-width must be a whole number >= 1 (got 0)"),
    (["--target", "pytorch", "--max-num-tokens", "0"],
     "--max-num-tokens must be a whole number >= 1 (got 0)"),
    (["--gemm-plugin", "fp8"], "--gemm-plugin fp8 needs a checkpoint quantized as FP8 (its "
                               "scaling factors), but this checkpoint's quant_algo is None"),
])
def test_engine_options_are_refused_before_any_work(tmp_path, tiny_model, capsys, flags,
                                                    message):
    """Before: --gemm-plugin fp8 on a float model (and, on --target pytorch or with
    --checkpoint-only, the size limits) were refused after the checkpoint was written, or not
    at all."""
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, *FLOAT, *flags)
    assert rc == 2 and _error(err) == f"build_engine: error: {message}"
    assert not out.exists()


def test_a_tokenizer_of_another_model_is_refused_before_any_work(tmp_path, tiny_model,
                                                                 tokenizer_dir, capsys):
    """Before: a tokenizer with more tokens than the model's vocabulary was refused only when
    the Triton repository was written, after the conversion (exit 2 with output left)."""
    hf_dir, _ = tiny_model(vocab_size=256)
    out = tmp_path / "out"
    rc, err = _run(capsys, "--model", hf_dir, "--output", out, "--tokenizer-dir", tokenizer_dir)
    assert rc == 2
    line = _error(err)
    assert line.startswith(f"build_engine: error: --tokenizer-dir {tokenizer_dir}: the "
                           f"tokenizer has ") and "but the model's vocab_size is 256" in line
    assert not out.exists()


def _tiny_with_tokenizer(tmp_path) -> Path:
    """A tiny random Llama with the golden matrix's committed tokenizer (1000 tokens)."""
    import shutil

    from examples.tiny import make_tiny_model

    d = tmp_path / "model"
    make_tiny_model(d, vocab_size=1000)
    for f in (REPO / "tests" / "golden" / "tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    return d
