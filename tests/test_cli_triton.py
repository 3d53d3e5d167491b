"""The whole build_engine flow ends in a filled, validated Triton model repository (DIR/triton):
written from the checkpoint when no engine can be built here, from the engines' own config.json
when they were built; Triton options that would fail after the conversion are refused before it."""
from __future__ import annotations

import json
from pathlib import Path

import builders.engine as E
from builders.cli import main
from common.ownership import RECORD
from builders.triton import validate_repo
from engine_fakes import TwoGpus


class NoTrtllmHere(E.TrtllmBackend):
    """TEST DOUBLE: the real backend, told TensorRT-LLM is not installed (whatever this host has),
    so the no-engine path is tested the same way everywhere."""

    def version(self):
        return None

    def import_error(self):
        return "No module named 'tensorrt_llm'"


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.strip().splitlines() if ln.startswith("build_engine: error:")]


def _pbtxt_param(text: str, key: str) -> str:
    """The string_value of parameter ``key`` in a config.pbtxt (parsed with Triton's schema)."""
    from builders.triton import parse_config

    return parse_config(text).parameters[key].string_value


def test_without_trtllm_the_run_writes_checkpoint_and_triton_then_says_how_to_finish(
        tmp_path, smollm2_dir, monkeypatch, capsys):
    monkeypatch.setattr(E, "TrtllmBackend", NoTrtllmHere)
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--tp", "3", "--output", str(out), "--no-progress",
               "--max-batch-size", "16"])
    cap = capsys.readouterr()
    assert rc == 3, cap.err
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "build.json", "checkpoint", "triton"]
    models = validate_repo(out / "triton")
    assert set(models) == {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing"}
    trt = (out / "triton" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert _pbtxt_param(trt, "gpt_model_path") == str((out / "engines").absolute())
    assert models["tensorrt_llm"].max_batch_size == 16  # the engine's --max-batch-size
    pre = (out / "triton" / "preprocessing" / "config.pbtxt").read_text()
    assert _pbtxt_param(pre, "tokenizer_dir") == str(Path(smollm2_dir).absolute())
    launch = (out / "triton" / "launch_triton.sh").read_text()
    assert launch.count('-n 1 "$TRITONSERVER"') == 3  # one process per rank (mpirun, tp 3)
    # one sentence, with the command that finishes the job on a GPU host (engines only: the
    # repository written here already matches what that build will produce)
    msg = [ln for ln in cap.err.splitlines() if ln.startswith("engines:")]
    assert len(msg) == 1 and "TensorRT-LLM is not installed" in msg[0]
    assert msg[0].endswith(f"build_engine --from-checkpoint {out}/checkpoint --output {out} "
                           f"--max-batch-size 16 --triton-target none")
    assert not (out / "engines").exists()
    manifest = json.loads((out / "build.json").read_text())
    assert "triton" in manifest["stage_timings_s"]
    assert any(f["path"] == "triton/tensorrt_llm/config.pbtxt" for f in manifest["outputs"]["files"])


def test_built_engines_fill_the_repository_from_their_own_config(tmp_path, smollm2_dir,
                                                                 fake_trtllm, monkeypatch):
    """Engines 'built' by the stand-in tensorrt_llm (a test double: placeholder engine files and
    an engine config.json shaped like TensorRT-LLM's); the repository is filled from that."""
    monkeypatch.setattr(E, "TrtllmBackend", TwoGpus)
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--output", str(out), "--no-progress",
               "--max-batch-size", "8", "--decoupled"])
    assert rc == 0
    assert (out / "engines" / "rank0.engine").is_file()
    models = validate_repo(out / "triton")
    assert models["tensorrt_llm"].max_batch_size == 8
    assert models["tensorrt_llm"].model_transaction_policy.decoupled is True
    launch = (out / "triton" / "launch_triton.sh").read_text()
    assert launch.count('-n 1 "$TRITONSERVER"') == 1


def test_model_without_tokenizer_is_refused_before_any_work(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = _error_lines(err)
    assert "cannot load a tokenizer" in line and "--tokenizer-dir" in line
    assert "--triton-target none" in line
    assert not out.exists()


def test_triton_target_none_writes_no_repository(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(E, "TrtllmBackend", NoTrtllmHere)
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--no-progress",
                 "--triton-target", "none"]) == 3
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "build.json", "checkpoint"]


def test_from_checkpoint_needs_a_tokenizer_dir(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                 "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["--from-checkpoint", str(out / "checkpoint"), "--output", str(tmp_path / "gpu")])
    (line,) = _error_lines(capsys.readouterr().err)
    assert rc == 2 and "--from-checkpoint needs --tokenizer-dir" in line
    assert not (tmp_path / "gpu").exists()


def test_pytorch_repository_is_not_for_engines(tmp_path, smollm2_dir, capsys):
    rc = main(["--model", str(smollm2_dir), "--output", str(tmp_path / "out"),
               "--triton-target", "pytorch"])
    (line,) = _error_lines(capsys.readouterr().err)
    assert rc == 2 and "--triton-target pytorch" in line
    assert not (tmp_path / "out").exists()


def test_workers_also_sets_the_engine_build_parallelism_unless_build_workers_is_given():
    from builders.cli_args import build_parser, defaults_from_other_flags as _defaults_from_other_flags

    def parsed(*argv):
        args = build_parser().parse_args(["--model", "m", "--output", "o", *argv])
        _defaults_from_other_flags(args)
        return E.options_from_args(args).build_workers

    assert parsed() == 1
    assert parsed("--workers", "4") == 4
    assert parsed("--workers", "4", "--build-workers", "2") == 2
