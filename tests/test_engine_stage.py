"""Contract tests of the engine stage (builders/engine.py).

TensorRT-LLM cannot be installed here, so the stage is tested against its seam
(``builders.engine.Backend``) with TEST DOUBLES that build nothing:

- ``RecordingFakeTrtllm``: the whole seam, in-process; records what reaches TensorRT-LLM.
- ``tests/trtllm_api_doubles.py``: stand-in ``tensorrt_llm`` packages on PYTHONPATH, one per API
  generation (1.0/1.1 ``BuildConfig.from_dict``, 1.2 pydantic ``BuildConfig``), so the real
  ``TrtllmBackend`` and its per-rank worker subprocess run for real and their calls into
  TensorRT-LLM's Python API (PluginConfig / BuildConfig / build_model / Engine.save) are recorded.

The real thing is exercised by tests/test_trtllm_real.py on a GPU host.
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
                             engine_command_hint, options_from_args, trtllm_build_args)
from convert.errors import UserError
from trtllm_api_doubles import GENERATIONS, PYDANTIC_1_2, write_package

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


class RecordingFakeTrtllm:
    """TEST DOUBLE of the TensorRT-LLM seam (``builders.engine.Backend``); it compiles nothing.

    It records every ``build_rank`` call (rank, the trtllm-build args it was given, device, log
    path), counts how many calls are in flight at once, writes placeholder files named like
    TensorRT-LLM's outputs (``rank{r}.engine``; ``config.json`` from rank 0) that are NOT
    engines, and can be told to report a version, a GPU count or an import error, to fail some
    ranks (exit status 1 and a traceback-like log), or to exit 0 without writing anything;
    ``gpu(device)`` reports ``gpu_name``/``cc`` (or ``gpu_by_device[device]``) as the GPU.
    ``barrier``: a threading.Barrier every call waits on, to prove calls overlap.
    """

    def __init__(self, *, version="1.2.1", gpus=8, import_error=None, fail_ranks=(),
                 silent_ranks=(), barrier=None, gpu_name="NVIDIA H100 80GB HBM3", cc="9.0",
                 gpu_by_device=None):
        self._version, self._gpus, self._import_error = version, gpus, import_error
        self._gpu = {"name": gpu_name, "compute_capability": cc}
        self._gpu_by_device = dict(gpu_by_device or {})
        self.fail_ranks, self.silent_ranks = set(fail_ranks), set(silent_ranks)
        self.barrier = barrier
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.devices_in_flight: set = set()
        self.device_clashes = 0

    def version(self):
        return self._version

    def import_error(self):
        return self._import_error

    def gpu_count(self):
        return self._gpus

    def gpu(self, device):
        return self._gpu_by_device.get(device, self._gpu)

    def build_rank(self, rank, checkpoint_dir, out_dir, trtllm_args, log_path, *, device=None,
                   cancel=None):
        with self._lock:
            self.calls.append({"rank": rank, "args": dict(trtllm_args), "device": device,
                               "checkpoint_dir": Path(checkpoint_dir), "log": Path(log_path)})
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if device in self.devices_in_flight:
                self.device_clashes += 1
            self.devices_in_flight.add(device)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            lines = [f"fake build of rank {rank} on device {device}"]
            if rank in self.fail_ranks:
                lines += ["Traceback (most recent call last):", '  File "build.py", line 1',
                          f"RuntimeError: fake failure in rank {rank}"]
                Path(log_path).write_text("\n".join(lines) + "\n")
                return 1
            Path(log_path).write_text("\n".join(lines) + "\n")
            if rank not in self.silent_ranks:
                (Path(out_dir) / f"rank{rank}.engine").write_bytes(b"placeholder, not an engine")
                if rank == 0:
                    (Path(out_dir) / "config.json").write_text('{"placeholder": true}')
            return 0
        finally:
            with self._lock:
                self.active -= 1
                self.devices_in_flight.discard(device)


def make_checkpoint(root: Path, tp: int = 2, pp: int = 1, quant_algo=None) -> Path:
    """A hand-written TRT-LLM checkpoint dir: real config.json, placeholder rank files."""
    ckpt = root / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    config = {
        "architecture": "LlamaForCausalLM", "dtype": "float16", "logits_dtype": "float16",
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
        "hidden_size": 256, "head_size": 32, "intermediate_size": 688, "vocab_size": 1000,
        "max_position_embeddings": 2048, "hidden_act": "silu", "norm_epsilon": 1e-6,
        "position_embedding_type": "rope_gpt_neox",
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": None,
                         "exclude_modules": ["lm_head"]},
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    for r in range(tp * pp):
        (ckpt / f"rank{r}.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return ckpt


def engine_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.engine"))


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
    (engines / "stale.txt").write_text("old")
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), force=True).ok
    assert not (engines / "stale.txt").exists() and (engines / "rank0.engine").is_file()
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


# --- the real backend and worker, against the stand-in tensorrt_llm packages ------------------

def _install_double(tmp_path, monkeypatch, files) -> Path:
    site = write_package(tmp_path / "fake_site", files)
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("FAKE_TRTLLM_RECORD", str(record))
    monkeypatch.delenv("FAKE_TRTLLM_FAIL", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return record


@pytest.fixture
def fake_trtllm(tmp_path, monkeypatch):
    """TEST DOUBLE: the 1.2 (pydantic) stand-in tensorrt_llm on the workers' PYTHONPATH; returns
    the record dir."""
    return _install_double(tmp_path, monkeypatch, PYDANTIC_1_2)


@pytest.fixture(params=sorted(GENERATIONS))
def any_trtllm(request, tmp_path, monkeypatch):
    """TEST DOUBLE: each API generation's stand-in tensorrt_llm in turn; returns the record dir."""
    return _install_double(tmp_path, monkeypatch, GENERATIONS[request.param])


class _TwoGpus(TrtllmBackend):
    """TEST DOUBLE: the real backend, told it has a supported TensorRT-LLM and 2 GPUs of one type
    (there are none here)."""

    def version(self):
        return "1.2.1"

    def gpu_count(self):
        return 2

    def gpu(self, device):
        return {"name": "TEST DOUBLE GPU", "compute_capability": "9.0"}


def test_real_worker_calls_trtllm_python_api_like_trtllm_build(tmp_path, any_trtllm):
    ckpt = make_checkpoint(tmp_path, tp=2)
    backend = TrtllmBackend()
    assert backend.import_error() is None  # the probe subprocess imports the stand-in
    work = tmp_path / "work"
    work.mkdir()
    args = trtllm_build_args(EngineOptions(max_batch_size=8, gemm_plugin="auto",
                                           log_level="verbose", kv_cache_type="continuous"))
    rc = backend.build_rank(1, ckpt, work, args, work / "rank1.log", device="3")
    log = (work / "rank1.log").read_text()
    assert rc == 0, log
    rec = json.loads((any_trtllm / "rank1.json").read_text())
    assert rec["rank"] == 1 and rec["ckpt_dir"] == str(ckpt.resolve())
    assert rec["saved_to"] == str(work.resolve())
    assert rec["cuda_visible_devices"] == "3"
    assert rec["log_level"] == "verbose"
    assert rec["architecture"] == "LlamaForCausalLM"
    plugin_args = {k: v for k, v in args.items() if k in E.PLUGIN_KEYS}
    assert "kv_cache_type" not in plugin_args and "paged_kv_cache" not in plugin_args
    plugin = rec["plugin_config"]
    if "1.2.1" in log:  # pydantic PluginConfig: "enable"/"disable" became booleans
        want = {k: {"enable": True, "disable": None if k.endswith("_plugin") else False}.get(v, v)
                for k, v in plugin_args.items()}
        assert {k: plugin[k] for k in want} == want
        assert plugin["paged_kv_cache"] is None  # left to kv_cache_type, as trtllm-build 1.2
    else:
        assert {k: plugin[k] for k in plugin_args} == plugin_args
    assert plugin["gemm_plugin"] == "auto" and plugin["validated"] is True
    assert rec["build_config"] == {
        "max_batch_size": 8, "max_input_len": 1024, "max_seq_len": None, "max_num_tokens": 8192,
        "max_beam_width": 1, "opt_num_tokens": None, "strongly_typed": True,
        "kv_cache_type": "CONTINUOUS", "input_timing_cache": None,
        # 1.0's from_dict takes None; 1.2's field is not Optional, so its default stays and
        # TensorRT-LLM writes the cache into the worker's scratch cwd (gone afterwards)
        "output_timing_cache": None if "1.0.0" in log else "model.cache"}
    assert rec["kwargs"] == {"use_fused_mlp": True}
    assert (work / "rank1.engine").is_file()
    assert "CUDA_VISIBLE_DEVICES=3" in log
    assert sorted(p.name for p in work.iterdir()) == ["rank1.engine", "rank1.log"]
    assert not list(tmp_path.rglob("model.cache"))


def test_worker_picks_the_build_config_form_by_inspecting_the_class(tmp_path, any_trtllm):
    """1.2's BuildConfig has no from_dict and 1.0's is not a pydantic model: the worker must
    choose by looking, so each double's log names the form it used."""
    ckpt = make_checkpoint(tmp_path, tp=1)
    work = tmp_path / "work"
    work.mkdir()
    assert TrtllmBackend().build_rank(0, ckpt, work, trtllm_build_args(EngineOptions()),
                                      work / "rank0.log", device="0") == 0
    log = (work / "rank0.log").read_text()
    form = "pydantic" if "TensorRT-LLM 1.2.1" in log else "from_dict"
    assert f"(BuildConfig: {form})" in log
    assert json.loads((any_trtllm / "rank0.json").read_text())["build_config"][
        "kv_cache_type"] == "PAGED"


def test_real_worker_turns_fused_mlp_off_for_non_fp8_quantization(tmp_path, any_trtllm):
    ckpt = make_checkpoint(tmp_path, tp=1, quant_algo="W8A8_SQ_PER_CHANNEL")
    work = tmp_path / "work"
    work.mkdir()
    rc = TrtllmBackend().build_rank(0, ckpt, work, trtllm_build_args(EngineOptions()),
                                    work / "rank0.log", device="0")
    assert rc == 0, (work / "rank0.log").read_text()
    assert json.loads((any_trtllm / "rank0.json").read_text())["kwargs"] == \
        {"use_fused_mlp": False}


def test_real_backend_end_to_end_two_ranks_two_gpus(tmp_path, any_trtllm):
    ckpt = make_checkpoint(tmp_path, tp=2)
    res = build_engines(ckpt, tmp_path / "out" / "engines", {"build_workers": 2},
                        backend=_TwoGpus())
    assert res.ok, res.message
    recs = [json.loads((any_trtllm / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["cuda_visible_devices"] for r in recs) == ["0", "1"]
    engines = tmp_path / "out" / "engines"
    assert engine_files(engines) == ["rank0.engine", "rank1.engine"]
    assert (engines / "config.json").is_file()
    for r in (0, 1):
        assert f"rank {r}: saved to" in (engines / "logs" / f"rank{r}.log").read_text()


def test_real_backend_failing_rank_reports_the_traceback(tmp_path, any_trtllm, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "1")
    ckpt = make_checkpoint(tmp_path, tp=2)
    out = tmp_path / "out"
    res = build_engines(ckpt, out / "engines", backend=_TwoGpus())
    assert res.status == FAILED and res.exit_code == 4
    assert "rank 1 (exit status 1)" in res.message
    assert "RuntimeError: fake build failure in rank 1" in res.message
    assert not (out / "engines").exists() and engine_files(out) == []
    assert "Traceback" in (out / "engines.failed-logs" / "rank1.log").read_text()


# --- --ranks: one node's ranks, GPU records, mixing refused -------------------------------------

def _tree(root: Path, skip=(".ranks",)) -> dict:
    """Every file under root (relative path → bytes), except the per-host GPU records."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)}


def test_two_runs_with_disjoint_ranks_equal_one_full_run(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2, pp=2)
    full = tmp_path / "full" / "engines"
    assert build_engines(ckpt, full, backend=RecordingFakeTrtllm()).ok
    split = tmp_path / "split" / "engines"
    first = RecordingFakeTrtllm()
    res = build_engines(ckpt, split, backend=first, ranks="0-1")
    assert res.ok and not res.complete and res.engines_dir is None
    assert sorted(c["rank"] for c in first.calls) == [0, 1]
    assert not split.exists()  # engines/ appears only complete
    assert "missing: 2-3" in res.message and "engines.partial" in res.message
    assert res.command_hint.endswith("--ranks 0-1")
    second = RecordingFakeTrtllm()
    res = build_engines(ckpt, split, backend=second, ranks="2-3")
    assert res.ok and res.complete and res.engines_dir == split
    assert sorted(c["rank"] for c in second.calls) == [2, 3]
    assert not split.with_name("engines.partial").exists()
    assert _tree(split) == _tree(full)  # engines, config.json and logs, byte for byte
    assert sorted(res.built_on) == [0, 1, 2, 3]
    assert all(rec["gpu"]["name"] == "NVIDIA H100 80GB HBM3" for rec in res.built_on.values())


def test_ranks_from_another_gpu_type_are_not_mixed_in(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0-1").ok
    stage = engines.with_name("engines.partial")
    before = _tree(stage, skip=())
    other = RecordingFakeTrtllm(gpu_name="NVIDIA A100-SXM4-80GB", cc="8.0")
    with pytest.raises(UserError) as e:
        build_engines(ckpt, engines, backend=other, ranks="2-3")
    msg = str(e.value)
    assert "\n" not in msg
    assert "rank0.engine was built on NVIDIA H100 80GB HBM3 (compute capability 9.0)" in msg
    assert "this host's GPU is NVIDIA A100-SXM4-80GB (compute capability 8.0)" in msg
    assert "NVIDIA/TensorRT-LLM#222" in msg and "--force" in msg
    assert other.calls == [] and _tree(stage, skip=()) == before and not engines.exists()
    # the same GPU type joins; --force rebuilding every rank here replaces the other GPU's ranks
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="2-3").complete
    res = build_engines(ckpt, engines, backend=other, force=True)
    assert res.complete and {r["gpu"]["compute_capability"] for r in res.built_on.values()} \
        == {"8.0"}


def test_a_host_mixing_gpu_types_in_one_run_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    fake = RecordingFakeTrtllm(gpus=2, gpu_by_device={"1": {"name": "NVIDIA L40S",
                                                            "compute_capability": "8.9"}})
    with pytest.raises(UserError, match="GPU 0 is NVIDIA H100 80GB HBM3 .* but GPU 1 is "
                                        "NVIDIA L40S"):
        build_engines(ckpt, tmp_path / "out" / "engines", {"build_workers": 2}, backend=fake)
    assert fake.calls == []


def test_ranks_with_other_options_are_not_mixed_in(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0").ok
    fake = RecordingFakeTrtllm()
    with pytest.raises(UserError, match="holds ranks built from another checkpoint or with "
                                        "other engine options"):
        build_engines(ckpt, engines, {"max_batch_size": 8}, backend=fake, ranks="1")
    assert fake.calls == []


def test_a_failing_subset_run_keeps_the_other_runs_ranks(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0-1").ok
    res = build_engines(ckpt, engines, backend=RecordingFakeTrtllm(fail_ranks={3}), ranks="2-3")
    assert res.status == FAILED
    stage = engines.with_name("engines.partial")
    assert engine_files(stage) == ["rank0.engine", "rank1.engine"]  # none of the failed run's
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="2-3").complete


@pytest.mark.parametrize("ranks, match", [
    ("2-5", r"--ranks 2-5 is not a range inside the world of 4 rank\(s\) \(0-3\)"),
    ("3-1", "is not a range inside"),
    ("a-b", "--ranks must be A-B or R with whole numbers"),
])
def test_bad_rank_ranges_are_user_errors(tmp_path, ranks, match):
    ckpt = make_checkpoint(tmp_path, tp=4)
    fake = RecordingFakeTrtllm()
    with pytest.raises(UserError, match=match):
        build_engines(ckpt, tmp_path / "out" / "engines", backend=fake, ranks=ranks)
    assert fake.calls == []


def test_a_rank_subset_needs_only_its_own_checkpoint_files(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    (ckpt / "rank0.safetensors").unlink()  # e.g. a node that converted ranks 2-3 only
    assert build_engines(ckpt, tmp_path / "out" / "engines", backend=RecordingFakeTrtllm(),
                         ranks="2-3").ok
    with pytest.raises(UserError, match="rank0.safetensors missing"):
        build_engines(ckpt, tmp_path / "out" / "engines", backend=RecordingFakeTrtllm(),
                      ranks="0-1")


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
    assert E._promote(engines.with_name("engines.partial"), engines, 2, wait_s=0.2) is True
    lock.rmdir()
    # the lock's holder, finding the stage already gone, reports the promoted engines too
    assert E._promote(engines.with_name("engines.partial"), engines, 2) is True
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
