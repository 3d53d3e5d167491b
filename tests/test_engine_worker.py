"""The real engine backend (builders/engine.py ``TrtllmBackend``) and its per-rank worker
subprocess (builders/engine_worker.py), run for real against the stand-in ``tensorrt_llm``
packages of tests/trtllm_api_doubles.py (TEST DOUBLES, one per API generation, on the workers'
PYTHONPATH via the ``any_trtllm`` fixture): what they call in TensorRT-LLM's Python API
(PluginConfig / BuildConfig / build_model / Engine.save) is recorded and checked. The real thing
is exercised by tests/test_trtllm_real.py on a GPU host.
"""
from __future__ import annotations

import json

from builders import engine as E
from builders.engine import FAILED, EngineOptions, TrtllmBackend, build_engines, trtllm_build_args
from engine_fakes import TwoGpus, engine_files, make_checkpoint


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
                        backend=TwoGpus())
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
    res = build_engines(ckpt, out / "engines", backend=TwoGpus())
    assert res.status == FAILED and res.exit_code == 4
    assert "rank 1 (exit status 1)" in res.message
    assert "RuntimeError: fake build failure in rank 1" in res.message
    assert not (out / "engines").exists() and engine_files(out) == []
    assert "Traceback" in (out / "engines.failed-logs" / "rank1.log").read_text()
