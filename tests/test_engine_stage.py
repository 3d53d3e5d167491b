"""Contract tests of the engine stage (builders/engine.py): options, parallelism, failures, the
"not built" answers, KV cache and length options.

TensorRT-LLM cannot be installed here, so the stage is tested against its seam
(``builders.engine.Backend``) with the TEST DOUBLE ``RecordingFakeTrtllm`` (engine_fakes.py), which
builds nothing and records what reaches TensorRT-LLM. The real backend and worker run against
stand-in ``tensorrt_llm`` packages in test_engine_worker.py, ``--ranks`` is in test_engine_ranks.py,
and the real thing is exercised by tests/test_trtllm_real.py on a GPU host.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import threading
from pathlib import Path

import pytest

from builders import engine as E
from builders.engine import (BUILT, FAILED, NOT_BUILT, CONTAINER, INSTALL_COMMAND, EngineOptions,
                             TrtllmBackend, add_engine_arguments, build_engines,
                             engine_command_hint, options_from_args)
from builders.engine_stage import engines_stage, promote
from common.errors import UserError
from engine_fakes import RecordingFakeTrtllm, engine_files, make_checkpoint

# What reaches TensorRT-LLM for every rank with default options: trtllm-build's names and the
# values trtllm-build 1.2 would pass (gemm_plugin unset = TensorRT-LLM's own default).
DEFAULT_TRTLLM_ARGS = {
    "max_batch_size": 2048,
    "max_input_len": 1024,
    "max_seq_len": None,
    "max_num_tokens": 8192,
    "max_beam_width": 1,
    "kv_cache_type": "paged",
    "gpt_attention_plugin": "auto",
    "gemm_swiglu_plugin": "disable",
    "low_latency_gemm_plugin": "disable",
    "remove_input_padding": "enable",
    "context_fmha": "enable",
    "use_paged_context_fmha": "enable",
    "use_fp8_context_fmha": "enable",
    "use_fused_mlp": "enable",
    "multiple_profiles": "disable",
    "log_level": "info",
}


# --- options and what reaches TensorRT-LLM ---------------------------------------------------

def test_default_flags_reach_trtllm_for_every_rank(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    fake = RecordingFakeTrtllm()
    res = build_engines(ckpt, tmp_path / "out" / "engines", backend=fake)
    assert res.status == BUILT and res.exit_code == 0 and res.ok
    assert sorted(c["rank"] for c in fake.calls) == [0, 1]
    for call in fake.calls:
        assert call["args"] == DEFAULT_TRTLLM_ARGS
        assert call["checkpoint_dir"] == ckpt
    engines = tmp_path / "out" / "engines"
    assert res.engines_dir == engines
    assert sorted(p.name for p in engines.iterdir()) == [".ranks", "config.json", "logs",
                                                         "rank0.engine", "rank1.engine"]
    rec = json.loads((engines / ".ranks" / "rank1.json").read_text())
    assert rec["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert rec["rank"] == 1 and rec["tensorrt_llm"] == "1.2.1" and rec["host"]
    assert res.complete and res.world_size == 2 and sorted(res.built_on) == [0, 1]
    assert sorted(p.name for p in (engines / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert "fake build of rank 1" in (engines / "logs" / "rank1.log").read_text()
    assert not (tmp_path / "out" / "engines.partial").exists()
    assert [r.status for r in res.ranks] == ["built", "built"]
    assert res.trtllm_version == "1.2.1"
    d = json.loads(json.dumps(res.as_dict()))  # for build.json
    assert d["status"] == "built" and d["ranks"][1]["log"] == str(engines / "logs" / "rank1.log")


def test_overrides_reach_trtllm(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)  # the converter's; must not clash
    add_engine_arguments(parser)
    ns = parser.parse_args([
        "--workers", "7", "--max-batch-size", "8", "--max-input-len", "512",
        "--max-seq-len", "4096", "--max-num-tokens", "2048", "--max-beam-width", "4",
        "--gemm-plugin", "auto", "--gpt-attention-plugin", "bfloat16",
        "--kv-cache-type", "continuous", "--remove-input-padding", "disable",
        "--context-fmha", "disable", "--use-paged-context-fmha", "disable",
        "--use-fp8-context-fmha", "disable", "--use-fused-mlp", "disable",
        "--multiple-profiles", "enable", "--log-level", "verbose", "--build-workers", "3"])
    opts = options_from_args(ns)
    fake = RecordingFakeTrtllm()
    assert build_engines(ckpt, tmp_path / "out" / "engines", opts, backend=fake).ok
    assert fake.calls[0]["args"] == {
        "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 4096, "max_num_tokens": 2048,
        "max_beam_width": 4, "gemm_plugin": "auto", "gpt_attention_plugin": "bfloat16",
        "gemm_swiglu_plugin": "disable", "low_latency_gemm_plugin": "disable",
        "kv_cache_type": "continuous", "remove_input_padding": "disable",
        "context_fmha": "disable", "use_paged_context_fmha": "disable",
        "use_fp8_context_fmha": "disable", "use_fused_mlp": "disable",
        "multiple_profiles": "enable", "log_level": "verbose"}
    assert ns.workers == 7 and opts.build_workers == 3  # build_workers never reaches TRT-LLM


def test_argparse_defaults_are_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    group = add_engine_arguments(parser)
    assert options_from_args(parser.parse_args([])) == EngineOptions()
    flags = {a.option_strings[0] for a in group._group_actions}
    assert {"--max-batch-size", "--max-input-len", "--max-seq-len", "--max-num-tokens",
            "--gemm-plugin", "--gpt-attention-plugin", "--kv-cache-type", "--paged-kv-cache",
            "--remove-input-padding", "--context-fmha", "--use-fp8-context-fmha",
            "--multiple-profiles", "--max-beam-width", "--build-workers",
            "--log-level"} <= flags
    assert "--workers" not in flags and "--tp" not in flags
    with pytest.raises(SystemExit):
        parser.parse_args(["--paged-kv-cache", "maybe"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-type", "paged_v2"])


def test_fp8_quantized_checkpoint_flags(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=1, quant_algo="FP8")
    fake = RecordingFakeTrtllm()
    opts = EngineOptions(gemm_plugin="fp8", gemm_swiglu_plugin="fp8",
                         low_latency_gemm_plugin="fp8")
    assert build_engines(ckpt, tmp_path / "out" / "engines", opts, backend=fake).ok
    args = fake.calls[0]["args"]
    assert (args["gemm_plugin"], args["gemm_swiglu_plugin"], args["low_latency_gemm_plugin"],
            args["use_fp8_context_fmha"], args["use_fused_mlp"]) == ("fp8",) * 3 + ("enable",) * 2


@pytest.mark.parametrize("quant", [None, "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"])
@pytest.mark.parametrize("flag", ["gemm_plugin", "gemm_swiglu_plugin", "low_latency_gemm_plugin"])
def test_fp8_plugins_refused_without_fp8_checkpoint(tmp_path, quant, flag):
    ckpt = make_checkpoint(tmp_path, tp=1, quant_algo=quant)
    fake = RecordingFakeTrtllm()
    with pytest.raises(UserError, match="needs a checkpoint quantized as FP8"):
        build_engines(ckpt, tmp_path / "out" / "engines", {flag: "fp8"}, backend=fake)
    assert fake.calls == []


@pytest.mark.parametrize("bad, match", [
    ({"max_batch_size": 0}, "--max-batch-size must be a whole number >= 1"),
    ({"max_seq_len": -5}, "--max-seq-len must be a whole number >= 1"),
    ({"build_workers": 0}, "--build-workers must be a whole number >= 1"),
    ({"paged_kv_cache": True}, "--paged-kv-cache must be one of enable, disable"),
    ({"gemm_plugin": "int8"}, "--gemm-plugin must be one of"),
    ({"gemm_swiglu_plugin": "fp8", "use_fused_mlp": "disable"}, "needs --use-fused-mlp enable"),
])
def test_bad_option_values_are_user_errors(tmp_path, bad, match):
    ckpt = make_checkpoint(tmp_path, tp=1)
    with pytest.raises(UserError, match=match):
        build_engines(ckpt, tmp_path / "out" / "engines", bad, backend=RecordingFakeTrtllm())


# --- parallelism -------------------------------------------------------------------------------

def test_ranks_run_in_parallel_up_to_build_workers(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2, pp=2)
    # every call waits until another one is in flight: passes only if 2 run at once
    fake = RecordingFakeTrtllm(gpus=8, barrier=threading.Barrier(2))
    said = []
    res = build_engines(ckpt, tmp_path / "out" / "engines", {"build_workers": 2}, backend=fake,
                        progress=said.append)
    assert res.ok, res.message
    assert "2 in parallel" in res.message
    assert sum("built in" in s for s in said) == 4
    assert fake.max_active == 2
    assert fake.device_clashes == 0  # two builds never share a GPU
    assert {c["device"] for c in fake.calls} == {"0", "1"}
    assert engine_files(tmp_path / "out" / "engines") == [f"rank{r}.engine" for r in range(4)]


def test_parallelism_capped_by_visible_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ckpt = make_checkpoint(tmp_path, tp=4)
    fake = RecordingFakeTrtllm(gpus=1)
    assert build_engines(ckpt, tmp_path / "out" / "engines", {"build_workers": 4},
                         backend=fake).ok
    assert fake.max_active == 1
    assert {c["device"] for c in fake.calls} == {"0"}


def test_devices_follow_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    ckpt = make_checkpoint(tmp_path, tp=2)
    fake = RecordingFakeTrtllm(gpus=2, barrier=threading.Barrier(2))
    assert build_engines(ckpt, tmp_path / "out" / "engines", {"build_workers": 2},
                         backend=fake).ok
    assert {c["device"] for c in fake.calls} == {"5", "7"}


# --- failure -----------------------------------------------------------------------------------

def test_one_failing_rank_fails_the_stage_with_its_log_tail(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=3)
    out = tmp_path / "out"
    fake = RecordingFakeTrtllm(fail_ranks={1})
    res = build_engines(ckpt, out / "engines", backend=fake)
    assert res.status == FAILED and res.exit_code == E.EXIT_BUILD_FAILED and not res.ok
    assert "rank 1" in res.message and "exit status 1" in res.message
    assert "RuntimeError: fake failure in rank 1" in res.message      # the log tail
    assert "RuntimeError: fake failure in rank 1" in res.log_tail
    assert [r.status for r in res.ranks] == ["built", "failed", "skipped"]  # no rank after it
    # nothing that looks like engines; logs kept aside
    assert not (out / "engines").exists()
    assert not (out / "engines.partial").exists()
    assert engine_files(out) == []
    assert res.logs_dir == out / "engines.failed-logs"
    assert sorted(p.name for p in res.logs_dir.iterdir()) == ["rank0.log", "rank1.log"]
    assert str(res.logs_dir / "rank1.log") in res.message


def test_failure_in_parallel_build_leaves_no_engines(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    out = tmp_path / "out"
    fake = RecordingFakeTrtllm(fail_ranks={2}, gpus=4)
    res = build_engines(ckpt, out / "engines", {"build_workers": 4}, backend=fake)
    assert res.status == FAILED
    assert "fake failure in rank 2" in res.message
    assert not (out / "engines").exists() and engine_files(out) == []


def test_rank_that_exits_0_without_an_engine_is_a_failure(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    res = build_engines(ckpt, tmp_path / "out" / "engines",
                        backend=RecordingFakeTrtllm(silent_ranks={1}))
    assert res.status == FAILED
    assert "rank 1 (exited 0 but wrote no rank1.engine)" in res.message
    assert not (tmp_path / "out" / "engines").exists()


def test_existing_engines_need_force_and_are_replaced_only_after_success(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=1)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm()).ok
    with pytest.raises(UserError, match="already exists; pass --force"):
        build_engines(ckpt, engines, backend=RecordingFakeTrtllm())
    (engines / "stale.txt").write_text("old")  # not the tool's: --force will not replace it
    with pytest.raises(UserError, match="engines/stale.txt was not written by build_engine: "
                                        "build_engine will not replace it"):
        build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), force=True)
    assert (engines / "stale.txt").read_text() == "old"
    (engines / "stale.txt").unlink()
    rank0 = engines / "rank0.engine"
    rank0.write_bytes(rank0.read_bytes() + b" rewritten")  # the tool's file, changed
    with pytest.raises(UserError, match="rank0.engine changed since build_engine wrote it"):
        build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), force=True)
    (engines / "rank0.engine").unlink()  # the tool's own, less a file: replaced
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), force=True).ok
    assert (engines / "rank0.engine").is_file()
    # a forced rebuild that fails leaves no engines (the old ones belong to a replaced checkpoint)
    res = build_engines(ckpt, engines, backend=RecordingFakeTrtllm(fail_ranks={0}), force=True)
    assert res.status == FAILED and not engines.exists()
    # and the next success clears the failed logs
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm()).ok
    assert not (tmp_path / "out" / "engines.failed-logs").exists()


@pytest.mark.parametrize("damage, match", [
    (lambda c: (c / "rank1.safetensors").unlink(), "rank1.safetensors missing"),
    (lambda c: (c / "config.json").unlink(), "config.json not found"),
    (lambda c: (c / "config.json").write_text("{not json"), "is not a TensorRT-LLM checkpoint"),
])
def test_incomplete_checkpoint_is_a_user_error(tmp_path, damage, match):
    ckpt = make_checkpoint(tmp_path, tp=2)
    damage(ckpt)
    fake = RecordingFakeTrtllm()
    with pytest.raises(UserError, match=match):
        build_engines(ckpt, tmp_path / "out" / "engines", backend=fake)
    assert fake.calls == [] and not (tmp_path / "out" / "engines").exists()


# --- not built: no TensorRT-LLM, wrong version, no GPU -------------------------------------------

def test_hint_format():
    assert engine_command_hint(Path("out/checkpoint"), Path("out"), EngineOptions()) == \
        "build_engine --from-checkpoint out/checkpoint --output out"
    assert engine_command_hint("my out/checkpoint", "my out",
                               {"max_batch_size": 8, "gemm_plugin": "auto",
                                "paged_kv_cache": "disable", "build_workers": 2}) == (
        "build_engine --from-checkpoint 'my out/checkpoint' --output 'my out' "
        "--max-batch-size 8 --kv-cache-type continuous --gemm-plugin auto --build-workers 2")


def _assert_not_built(res, tmp_path, hint):
    assert res.status == NOT_BUILT and res.exit_code == 3 and not res.ok
    assert "\n" not in res.message
    assert res.message.count(". ") == 0 and res.message.startswith("Engines were not built")
    assert res.message.endswith("run: " + hint)
    assert res.command_hint == hint
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # nothing written


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None,
                    reason="tensorrt_llm is installed here; tests/test_trtllm_real.py covers it")
def test_without_trtllm_the_real_backend_says_how_to_finish(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    opts = EngineOptions(max_batch_size=16, max_seq_len=2048)
    res = build_engines(ckpt, tmp_path / "out" / "engines", opts, backend=TrtllmBackend())
    hint = (f"build_engine --from-checkpoint {ckpt} --output {tmp_path / 'out'} "
            "--max-batch-size 16 --max-seq-len 2048")
    _assert_not_built(res, tmp_path, hint)
    assert "TensorRT-LLM is not installed" in res.message
    assert INSTALL_COMMAND in res.message and CONTAINER in res.message


@pytest.mark.parametrize("version, why", [
    ("1.3.0rc2", "1.3 removed the TensorRT engine backend"),
    ("1.4.0", "1.3 removed the TensorRT engine backend"),
    ("0.21.0", "checked against the 1.0 to 1.2 Python API only"),
    ("0.12.0", "checked against the 1.0 to 1.2 Python API only"),
])
def test_version_out_of_range_says_what_to_install(tmp_path, version, why):
    ckpt = make_checkpoint(tmp_path, tp=1)
    fake = RecordingFakeTrtllm(version=version)
    res = build_engines(ckpt, tmp_path / "out" / "engines", backend=fake)
    _assert_not_built(res, tmp_path, engine_command_hint(ckpt, tmp_path / "out"))
    assert f"TensorRT-LLM {version} is installed" in res.message and why in res.message
    assert 'pip install "tensorrt_llm>=1.0,<1.3" --extra-index-url https://pypi.nvidia.com' \
        in res.message
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.2.1" in res.message
    assert fake.calls == []


@pytest.mark.parametrize("version, ok", [
    ("0.12.0", False), ("0.21.0", False), ("1.0.0rc4", True), ("1.0.0", True), ("1.1.0", True),
    ("1.2.0rc6", True), ("1.2.1", True), ("0.11.0", False), ("1.3.0", False),
    ("1.3.0rc10", False), ("2.0", False), ("unknown", False),
])
def test_version_window(version, ok):
    assert E.version_in_range(version) is ok


def test_no_gpu_is_not_built(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=1)
    fake = RecordingFakeTrtllm(gpus=0)
    res = build_engines(ckpt, tmp_path / "out" / "engines", backend=fake)
    _assert_not_built(res, tmp_path, engine_command_hint(ckpt, tmp_path / "out"))
    assert "no NVIDIA GPU is visible" in res.message and fake.calls == []


def test_broken_import_is_not_built(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=1)
    fake = RecordingFakeTrtllm(import_error="ImportError: libnvinfer.so.10: cannot open")
    res = build_engines(ckpt, tmp_path / "out" / "engines", backend=fake)
    _assert_not_built(res, tmp_path, engine_command_hint(ckpt, tmp_path / "out"))
    assert "import tensorrt_llm 1.2.1 fails (ImportError: libnvinfer.so.10" in res.message


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None,
                    reason="tensorrt_llm is installed here")
def test_real_probe_reports_the_import_error(tmp_path):
    class InstalledButMissing(TrtllmBackend):
        def version(self):
            return "1.2.1"

        def gpu_count(self):
            return 1

    ckpt = make_checkpoint(tmp_path, tp=1)
    res = build_engines(ckpt, tmp_path / "out" / "engines", backend=InstalledButMissing())
    assert res.status == NOT_BUILT
    assert "No module named 'tensorrt_llm'" in res.message


# --- --kv-cache-type / --paged-kv-cache, --max-seq-len ------------------------------------------

def test_paged_kv_cache_is_the_deprecated_spelling_of_kv_cache_type(capsys):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert options_from_args(parser.parse_args(["--paged-kv-cache", "disable"])).kv_cache_type \
        == "continuous"
    assert "--paged-kv-cache is deprecated" in capsys.readouterr().err
    assert options_from_args(parser.parse_args([])).kv_cache_type == "paged"
    assert options_from_args(parser.parse_args(["--kv-cache-type", "disabled"])).paged_kv_cache \
        == "disable"
    with pytest.raises(UserError, match="--paged-kv-cache enable contradicts --kv-cache-type "
                                        "continuous"):
        options_from_args(parser.parse_args(["--paged-kv-cache", "enable",
                                             "--kv-cache-type", "continuous"]))


@pytest.mark.parametrize("scaling, want", [
    (None, 2048),
    ({"type": "linear", "factor": 4.0}, 8192),
    ({"rope_type": "dynamic", "factor": 1.5}, 3072),
    ({"rope_type": "yarn", "factor": 2.5}, 5120),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, 2048),
    ({"type": "longrope", "factor": 4.0}, 2048),
])
def test_deduced_max_seq_len_follows_trtllm(scaling, want):
    config = {"max_position_embeddings": 2048, "rotary_scaling": scaling}
    assert E.deduced_max_seq_len(config) == want
    assert E.effective_lengths(EngineOptions(max_input_len=4096), config) == \
        {"max_seq_len": want, "max_input_len": min(4096, want)}
    assert E.deduced_max_seq_len({"max_position_embeddings": 1001,
                                  "rotary_scaling": {"type": "linear", "factor": 1.5}}) == 1502


def test_max_seq_len_help_says_what_trtllm_does():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "not for llama3/longrope/su scaling" in text
    assert "scaled by its rope factor" not in text


def test_two_runs_completing_at_once_promote_the_engines_once(tmp_path):
    """The run holding engines.lock renames engines.partial; the other finds it done."""
    ckpt = make_checkpoint(tmp_path, tp=2)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0").ok
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="1").complete
    lock = engines.with_name("engines.lock")
    lock.mkdir()  # as if another run were renaming right now
    assert promote(engines_stage(engines), 2, wait_s=0.2) is True
    lock.rmdir()
    # the lock's holder, finding the stage already gone, reports the promoted engines too
    assert promote(engines_stage(engines), 2) is True
    assert not lock.exists() and engine_files(engines) == ["rank0.engine", "rank1.engine"]


def test_real_backend_reads_the_gpu_from_nvidia_smi(tmp_path, monkeypatch):
    """TEST DOUBLE of nvidia-smi on PATH answering the query the backend makes."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=index,uuid,name,compute_cap" ] || exit 9\n'
                   'echo "0, GPU-aaaa, NVIDIA H100 80GB HBM3, 9.0"\n'
                   'echo "1, GPU-bbbb, NVIDIA A100-SXM4-80GB, 8.0"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:/usr/bin:/bin")
    b = TrtllmBackend()
    assert b.gpu("1") == {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    assert b.gpu("GPU-aaaa") == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert b.gpu("7") is None


def test_result_reports_the_lengths_the_engine_gets(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=1)  # max_position_embeddings 2048, no rope scaling
    res = build_engines(ckpt, tmp_path / "out" / "engines", {"max_input_len": 4096},
                        backend=RecordingFakeTrtllm())
    assert res.lengths == {"max_seq_len": 2048, "max_input_len": 2048}  # clipped, as TRT-LLM
    assert json.loads(json.dumps(res.as_dict()))["lengths"]["max_seq_len"] == 2048
