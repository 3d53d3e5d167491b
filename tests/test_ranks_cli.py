"""``build_engine --ranks A-B`` end to end: real conversion (tiny model), the real engine backend
and worker against the 1.2 TEST DOUBLE of tensorrt_llm (tests/trtllm_api_doubles.py, placeholder
engines that embed the BuildConfig they received), the real Triton repository writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import builders.engine as E
from builders.cli import main
from common.ownership import RECORD
from engine_fakes import TwoGpus


def _files(root: Path) -> dict:
    """relative path → bytes of every output file except build.json, the ownership record (it
    lists the Triton files' sizes, which name the output dir), the per-host records (.ranks: host
    names) and logs (they name the run's own staging dir)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.as_posix() not in ("build.json", RECORD) \
                and ".ranks" not in rel.parts \
                and "logs" not in rel.parts:
            out[rel.as_posix()] = p.read_bytes()
    return out


def _run(out: Path, hf_dir, tok_dir, *extra) -> int:
    return main(["--model", str(hf_dir), "--tp", "2", "--pp", "2", "--output", str(out),
                 "--no-progress", "--tokenizer-dir", str(tok_dir), "--max-batch-size", "8",
                 *extra])


def test_two_nodes_with_disjoint_ranks_write_what_one_full_run_writes(
        tmp_path, tiny_model, smollm2_dir, fake_trtllm, monkeypatch, capsys):
    monkeypatch.setattr(E, "TrtllmBackend", TwoGpus)
    hf_dir, _ = tiny_model(vocab_size=49152)  # SmolLM2's tokenizer serves it
    full, split = tmp_path / "full", tmp_path / "split"
    assert _run(full, hf_dir, smollm2_dir) == 0
    capsys.readouterr()

    assert _run(split, hf_dir, smollm2_dir, "--ranks", "0-1") == 0
    said = capsys.readouterr().out
    assert "triton: not written yet" in said
    assert sorted(p.name for p in split.iterdir()) == [RECORD, "build.json",
                                                       "checkpoint.partial", "engines.partial"]
    first = json.loads((split / "build.json").read_text())["engines"]
    assert first["ranks_built_here"] == [0, 1] and first["complete"] is False
    assert first["built_on"]["0"]["gpu"] == {"name": "TEST DOUBLE GPU",
                                             "compute_capability": "9.0"}

    assert _run(split, hf_dir, smollm2_dir, "--ranks", "2-3") == 0
    assert sorted(p.name for p in split.iterdir()) == [RECORD, "build.json", "checkpoint",
                                                       "engines", "triton"]
    a, b = _files(full), _files(split)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("triton/") for k in a) and "engines/rank3.engine" in a
    diff = [k for k in a if a[k] != b[k]]
    # the Triton repository names the output dir it was written for: compare it relocated
    diff = [k for k in diff if a[k].replace(str(full).encode(), b"@") !=
            b[k].replace(str(split).encode(), b"@")]
    assert diff == []
    manifest = json.loads((split / "build.json").read_text())["engines"]
    assert manifest["complete"] is True and manifest["ranks_built_here"] == [2, 3]
    assert sorted(manifest["built_on"]) == ["0", "1", "2", "3"]


def test_ranks_with_a_calibrated_format_are_refused_before_any_work(tmp_path, tiny_model,
                                                                    capsys):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--tp", "2", "--output", str(out), "--no-progress",
               "--checkpoint-only", "--fp8", "--ranks", "0"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--ranks cannot split a calibrated format" in err
    assert not (out / "checkpoint.partial").exists()


@pytest.mark.parametrize("extra, match", [
    (["--ranks", "0-4"], "is not a range inside the world of 4 rank(s)"),
    (["--ranks", "0", "--verify"], "--verify and --eval-ppl run the whole checkpoint"),
])
def test_bad_ranks_are_refused_before_any_work(tmp_path, tiny_model, capsys, extra, match):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--tp", "2", "--pp", "2", "--output", str(out),
               "--no-progress", "--checkpoint-only", *extra])
    assert rc == 2 and match in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_from_checkpoint_on_another_gpu_type_refuses_to_mix_in_one_line(tmp_path, tiny_model,
                                                                         monkeypatch, capsys):
    from engine_fakes import RecordingFakeTrtllm

    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--tp", "2", "--output", str(out), "--no-progress",
                 "--checkpoint-only"]) == 0
    ckpt = out / "checkpoint"
    h100 = RecordingFakeTrtllm()  # TEST DOUBLE reporting an H100 for every device
    monkeypatch.setattr(E, "TrtllmBackend", lambda: h100)
    base = ["--from-checkpoint", str(ckpt), "--output", str(out), "--triton-target", "none"]
    assert main(base + ["--ranks", "0"]) == 0
    a100 = RecordingFakeTrtllm(gpu_name="NVIDIA A100-SXM4-80GB", cc="8.0")
    monkeypatch.setattr(E, "TrtllmBackend", lambda: a100)
    capsys.readouterr()
    assert main(base + ["--ranks", "1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("build_engine: error: ")
    assert "built on NVIDIA H100 80GB HBM3 (compute capability 9.0)" in err[0]
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in err[0]
    assert a100.calls == [] and not (out / "engines").exists()


def test_conversion_ranks_of_other_options_are_not_mixed_in(tmp_path, tiny_model):
    from convert_helper import convert_checkpoint
    from common.errors import UserError

    hf_dir, _ = tiny_model()
    ckpt = tmp_path / "out" / "checkpoint"
    convert_checkpoint(hf_dir, ckpt, tp=2, dtype="float16", progress=False, ranks=[0])
    part = ckpt.with_name("checkpoint.partial")
    assert not ckpt.exists() and sorted(p.name for p in part.iterdir()) == [
        ".rank0.safetensors.blake3", "config.json", "fingerprint.json", "rank0.safetensors"]
    before = (part / "rank0.safetensors").read_bytes()
    with pytest.raises(UserError, match="holds ranks converted from other inputs or options"):
        convert_checkpoint(hf_dir, ckpt, tp=2, dtype="bfloat16", progress=False, ranks=[1])
    assert (part / "rank0.safetensors").read_bytes() == before
    convert_checkpoint(hf_dir, ckpt, tp=2, dtype="float16", progress=False, ranks=[1])
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "rank0.safetensors",
                                                      "rank1.safetensors"]
    full = tmp_path / "full" / "checkpoint"
    convert_checkpoint(hf_dir, full, tp=2, dtype="float16", progress=False)
    for name in ("config.json", "rank0.safetensors", "rank1.safetensors"):
        assert (ckpt / name).read_bytes() == (full / name).read_bytes()
