"""Triton model repositories (builders/triton/): schema, values, validation and arguments of the
TensorRT-engine repository and of the LLM-API (PyTorch) one. The model.py files run with test
doubles in test_triton_models.py; the doubles and helpers are in triton_fakes.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from builders import triton as tr
from common.errors import UserError
from common.ownership import RECORD
from triton_fakes import checkpoint_config, engine_repo, hf_dir, no_placeholders, params


# --- repository contents ------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 3])
def test_engine_repo_from_real_checkpoint_config(tmp_path, tokenizer_dir, tiny_model, tp):
    """tp 1 and tp 3: the checkpoint config comes from this project's converter (a tiny Llama
    with 6 heads), the build options from the engine flags; every config.pbtxt parses with
    Triton's schema and carries the right values."""
    from convert.hf_config import from_hugging_face
    from model.config import read_hf_config

    hf_dir, _ = tiny_model("llama", hidden_size=96, num_attention_heads=6,
                           num_key_value_heads=3, intermediate_size=192)
    ckpt = from_hugging_face(read_hf_config(hf_dir), tp=tp, pp=1)
    assert ckpt["mapping"]["world_size"] == tp
    out = tmp_path / "out"
    ec = tr.engine_config_from_checkpoint(ckpt, argparse.Namespace(max_batch_size=16,
                                                                   max_input_len=200))
    repo = tr.write_engine_repo(out / "triton", engine_dir=out / "engines",
                                tokenizer_dir=tokenizer_dir, engine_config=ec, options=None)
    assert repo == (out / "triton").absolute()
    configs = tr.validate_repo(repo)
    assert set(configs) == {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing"}
    no_placeholders(repo)
    for name in configs:  # the files themselves parse with the protobuf text format
        text = (repo / name / "config.pbtxt").read_text()
        assert tr.parse_config(text, name).name == name

    llm = configs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm"
    assert llm.max_batch_size == 16  # min(64, engine max_batch_size)
    assert llm.dynamic_batching.preferred_batch_size == [16]
    assert llm.model_transaction_policy.decoupled is False
    p = params(llm)
    assert p["gpt_model_path"] == str((out / "engines").resolve())
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.9"
    assert p["exclude_input_in_output"] == "true"
    assert p["max_beam_width"] == "1"
    for required in ("tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path"):
        assert required in p  # read by the C++ backend without a fallback
    outs = {t.name: t for t in llm.output}
    assert tr.model_config_pb2().DataType.Name(outs["generation_logits"].data_type) == \
        "TYPE_FP32"  # the checkpoint's logits_dtype
    for m in ("preprocessing", "postprocessing"):
        assert params(configs[m])["tokenizer_dir"] == str(Path(tokenizer_dir).resolve())
    assert params(configs["preprocessing"])["max_input_len"] == "200"
    assert all(c.max_batch_size == 16 for c in configs.values())

    # world size: one tritonserver rank per engine rank (leader mode)
    info = json.loads((repo / "triton_repo.json").read_text())
    assert (info["world_size"], info["tp_size"], info["pp_size"]) == (tp, tp, 1)
    assert info["launch"] == tr.launch_command(str(repo), tp)
    assert info["launch"].count("-n") == tp
    assert info["launch"].count("--load-model=tensorrt_llm") == tp - 1
    script = (repo / "launch_triton.sh").read_text()
    assert script.count('-n 1 "$TRITONSERVER"') == tp
    assert os.access(repo / "launch_triton.sh", os.X_OK)
    subprocess.run(["bash", "-n", str(repo / "launch_triton.sh")], check=True)


def test_engine_repo_accepts_real_engine_config_json(tmp_path, tokenizer_dir):
    """The engine's own config.json (pretrained_config + build_config, as trtllm-build writes
    it): its batch size, beam width and logits dtype reach the configs."""
    engine_cfg = {
        "version": "1.2.1",
        "pretrained_config": checkpoint_config(2, 1, logits_dtype="float16"),
        "build_config": {"max_input_len": 512, "max_seq_len": 1024, "max_batch_size": 128,
                         "max_beam_width": 2, "max_num_tokens": 4096,
                         "plugin_config": {"paged_kv_cache": True, "remove_input_padding": True,
                                           "gpt_attention_plugin": "auto"}}}
    repo = tr.write_engine_repo(tmp_path / "triton", engine_dir=tmp_path / "engines",
                                tokenizer_dir=tokenizer_dir, engine_config=engine_cfg,
                                options={"triton_max_batch_size": 32, "decoupled": True,
                                         "batching_strategy": "inflight_batching",
                                         "kv_cache_free_gpu_mem_fraction": 0.5,
                                         "max_queue_delay_microseconds": 100,
                                         "exclude_input_in_output": False})
    configs = tr.validate_repo(repo)
    llm = configs["tensorrt_llm"]
    p = params(llm)
    assert llm.max_batch_size == 32 and configs["ensemble"].max_batch_size == 32
    assert llm.model_transaction_policy.decoupled is True
    assert llm.dynamic_batching.max_queue_delay_microseconds == 100
    assert (p["max_beam_width"], p["gpt_model_type"], p["kv_cache_free_gpu_mem_fraction"],
            p["exclude_input_in_output"]) == ("2", "inflight_batching", "0.5", "false")
    name = tr.model_config_pb2().DataType.Name
    assert {name(t.data_type) for t in llm.output if "logits" in t.name} == {"TYPE_FP16"}
    assert {name(t.data_type) for t in configs["ensemble"].output if "logits" in t.name} == \
        {"TYPE_FP16"}
    assert params(configs["preprocessing"])["max_input_len"] == "512"
    assert "generate_stream" in (repo / "launch_triton.sh").read_text()
    info = json.loads((repo / "triton_repo.json").read_text())
    assert info["world_size"] == 2 and info["engine_max_batch_size"] == 128


def test_engine_config_read_from_built_engines(tmp_path, tokenizer_dir):
    engines = tmp_path / "engines"
    engines.mkdir()
    with pytest.raises(UserError, match="cannot read the engine config"):
        tr.write_engine_repo(tmp_path / "t", engine_dir=engines, tokenizer_dir=tokenizer_dir,
                             engine_config=None)
    (engines / "config.json").write_text(json.dumps(tr.engine_config_from_checkpoint(
        checkpoint_config(2), {"max_batch_size": 4})))
    repo = tr.write_engine_repo(tmp_path / "t", engine_dir=engines, tokenizer_dir=tokenizer_dir,
                                engine_config=None)
    assert tr.validate_repo(repo)["tensorrt_llm"].max_batch_size == 4


def test_bare_checkpoint_config_and_engine_defaults(tmp_path, tokenizer_dir):
    repo = tr.write_engine_repo(tmp_path / "t", engine_dir=tmp_path / "e",
                                tokenizer_dir=tokenizer_dir, engine_config=checkpoint_config(),
                                options=None)
    llm = tr.validate_repo(repo)["tensorrt_llm"]
    assert llm.max_batch_size == 64  # min(64, trtllm-build's default 2048)
    info = json.loads((repo / "triton_repo.json").read_text())
    assert info["max_seq_len"] == 2048 and info["max_input_len"] == 1024


def test_ensemble_wiring_matches_the_models(tmp_path, tokenizer_dir):
    """Every ensemble step maps existing tensors with the same data types; names are those the
    tensorrtllm backend and the upstream ensemble use."""
    repo = engine_repo(tmp_path, tokenizer_dir)
    configs = tr.validate_repo(repo)
    steps = {s.model_name: s for s in configs["ensemble"].ensemble_scheduling.step}
    assert list(steps) == ["preprocessing", "tensorrt_llm", "postprocessing"]
    assert steps["preprocessing"].input_map["QUERY"] == "text_input"
    assert steps["preprocessing"].input_map["REQUEST_OUTPUT_LEN"] == "max_tokens"
    llm_in = dict(steps["tensorrt_llm"].input_map)
    assert llm_in["input_ids"] == "_INPUT_ID" and llm_in["input_lengths"] == "_REQUEST_INPUT_LEN"
    assert llm_in["request_output_len"] == "_REQUEST_OUTPUT_LEN"
    assert llm_in["end_id"] == "_OUT_END_ID" and llm_in["pad_id"] == "_OUT_PAD_ID"
    assert llm_in["streaming"] == "stream" and llm_in["runtime_top_k"] == "top_k"
    assert steps["tensorrt_llm"].output_map["output_ids"] == "_TOKENS_BATCH"
    assert steps["tensorrt_llm"].output_map["sequence_length"] == "_SEQUENCE_LENGTH"
    assert steps["postprocessing"].output_map["OUTPUT"] == "text_output"
    ens_in = {t.name for t in configs["ensemble"].input}
    assert {"text_input", "max_tokens", "end_id", "pad_id", "stream"} <= ens_in
    assert {t.name for t in configs["ensemble"].input if not t.optional} == \
        {"text_input", "max_tokens"}


# --- validation failures ------------------------------------------------------------------------

def _one_line(e: UserError) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("damage, expect", [
    (lambda t: t.replace("data_type: TYPE_INT32", "data_type: TYPE_INTEGER", 1),
     "not a valid Triton model config"),
    (lambda t: t.replace("max_batch_size:", "max_batch_sise:", 1),
     "not a valid Triton model config"),
    (lambda t: t[: len(t) // 2], "not a valid Triton model config"),
    (lambda t: t.replace('string_value: "inflight_fused_batching"',
                         'string_value: "${batching_strategy}"'),
     "unfilled template placeholder ${batching_strategy}"),
    (lambda t: t.replace('name: "output_ids"', 'name: "output_token_ids"'),
     "has no such output"),
    (lambda t: t.replace('name: "input_lengths"\n  data_type: TYPE_INT32',
                         'name: "input_lengths"\n  data_type: TYPE_INT64'),
     "is TYPE_INT32 but input 'input_lengths' of 'tensorrt_llm' is TYPE_INT64"),
    (lambda t: t.replace('name: "tensorrt_llm"', 'name: "trtllm"', 1),
     "differs from its directory"),
])
def test_corrupted_config_fails_validation(tmp_path, tokenizer_dir, damage, expect):
    repo = engine_repo(tmp_path, tokenizer_dir)
    cfg = repo / "tensorrt_llm" / "config.pbtxt"
    cfg.write_text(damage(cfg.read_text()))
    with pytest.raises(UserError) as e:
        tr.validate_repo(repo)
    msg = _one_line(e)
    assert expect in msg and "tensorrt_llm" in msg


def test_broken_repositories_fail_validation(tmp_path, tokenizer_dir):
    repo = engine_repo(tmp_path, tokenizer_dir)
    (repo / "preprocessing" / "1" / "model.py").unlink()
    with pytest.raises(UserError, match="model.py missing"):
        tr.validate_repo(repo)
    repo = engine_repo(tmp_path / "b", tokenizer_dir)
    ens = repo / "ensemble" / "config.pbtxt"
    ens.write_text(ens.read_text().replace('model_name: "postprocessing"',
                                           'model_name: "detokenizer"'))
    with pytest.raises(UserError, match="'detokenizer', which is not in the repository"):
        tr.validate_repo(repo)
    repo = engine_repo(tmp_path / "c", tokenizer_dir)
    ens = repo / "ensemble" / "config.pbtxt"
    text = ens.read_text()
    feed = 'key: "SEQUENCE_LENGTH"\n      value: "_SEQUENCE_LENGTH"'
    assert text.count(feed) == 1
    ens.write_text(text.replace(feed, feed.replace("_SEQUENCE_LENGTH", "_SEQ_LEN")))
    with pytest.raises(UserError, match="'_SEQ_LEN', which is neither an ensemble input"):
        tr.validate_repo(repo)
    with pytest.raises(UserError, match="not a directory"):
        tr.validate_repo(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model directories"):
        tr.validate_repo(tmp_path / "empty")


def test_bad_inputs_are_user_errors(tmp_path, tokenizer_dir):
    ec = tr.engine_config_from_checkpoint(checkpoint_config(), {})
    kw = dict(engine_dir=tmp_path / "e", engine_config=ec)
    with pytest.raises(UserError, match="needs a tokenizer"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=None, **kw)
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tmp_path, **kw)
    small = tr.engine_config_from_checkpoint(checkpoint_config(vocab_size=100), {})
    with pytest.raises(UserError, match="vocab_size is 100"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, engine_dir=tmp_path,
                             engine_config=small)
    no_paged = tr.engine_config_from_checkpoint(checkpoint_config(),
                                                {"paged_kv_cache": "disable"})
    with pytest.raises(UserError, match="paged KV cache"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, engine_dir=tmp_path,
                             engine_config=no_paged)
    continuous = tr.engine_config_from_checkpoint(checkpoint_config(),  # TensorRT-LLM 1.2 spelling
                                                  {"kv_cache_type": "continuous"})
    with pytest.raises(UserError, match="paged KV cache"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, engine_dir=tmp_path,
                             engine_config=continuous)
    bf16 = {"pretrained_config": checkpoint_config(logits_dtype="bfloat16"), "build_config": {}}
    with pytest.raises(UserError, match="logits_dtype bfloat16 cannot be served"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, engine_dir=tmp_path,
                             engine_config=bf16)
    with pytest.raises(UserError, match="--batching-strategy V1 .* deprecated"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, **kw,
                             options={"batching_strategy": "V1"})
    with pytest.raises(UserError, match="--triton-target pytorch does not apply to --target "
                                        "engine"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, **kw,
                             options={"triton_target": "pytorch"})
    with pytest.raises(UserError, match="neither an engine config.json"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, engine_dir=tmp_path,
                             engine_config={"hidden_size": 4})
    with pytest.raises(UserError, match="kv-cache-free-gpu-mem-fraction"):
        tr.write_engine_repo(tmp_path / "t", tokenizer_dir=tokenizer_dir, **kw,
                             options={"kv_cache_free_gpu_mem_fraction": 1.5})
    with pytest.raises(UserError, match="--triton-model-root must be an absolute path"):
        tr.TritonOptions.from_any({"triton_model_root": "models"})
    assert not (tmp_path / "t").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t.")]


def test_atomic_write_and_force(tmp_path, tokenizer_dir):
    repo = engine_repo(tmp_path, tokenizer_dir)
    marker = repo / "stale.txt"
    marker.write_text("old")
    with pytest.raises(UserError, match="already exists; pass --force"):
        engine_repo(tmp_path, tokenizer_dir)
    assert marker.exists()
    # a file the tool did not write: --force does not replace it (common.ownership)
    with pytest.raises(UserError, match="triton/stale.txt was not written by build_engine"):
        engine_repo(tmp_path, tokenizer_dir, force=True)
    assert marker.read_text() == "old"
    marker.unlink()
    before = (repo / "launch_triton.sh").stat().st_ino
    engine_repo(tmp_path, tokenizer_dir, force=True)
    assert (repo / "launch_triton.sh").stat().st_ino != before and tr.validate_repo(repo)
    # no temp dirs left; the ownership record beside the repository
    assert sorted(p.name for p in repo.parent.iterdir()) == [RECORD, "triton"]


def test_tokenizer_outside_the_output_is_an_external_path(tmp_path, tokenizer_dir):
    """Issue 29: the repository names every path it needs outside the build output directory
    (a copy of the output alone would lack them), with or without --triton-model-root."""
    ext = str(Path(tokenizer_dir).resolve())
    repo = engine_repo(tmp_path, tokenizer_dir)
    info = json.loads((repo / "triton_repo.json").read_text())
    assert info["external_paths"] == [ext]
    assert params(tr.validate_repo(repo)["preprocessing"])["tokenizer_dir"] == ext
    inside = tmp_path / "b" / "out" / "tokenizer"  # beside triton/ in the output: not external
    shutil.copytree(tokenizer_dir, inside)
    repo = engine_repo(tmp_path / "b", inside)
    assert json.loads((repo / "triton_repo.json").read_text())["external_paths"] == []


def test_model_root_and_copied_tokenizer(tmp_path, tokenizer_dir):
    """--triton-model-root: paths inside the output dir are written for the serving host's mount;
    --triton-copy-tokenizer makes the repository self-contained."""
    repo = engine_repo(tmp_path, tokenizer_dir, triton_model_root="/models/llama/")
    configs = tr.validate_repo(repo)
    assert params(configs["tensorrt_llm"])["gpt_model_path"] == "/models/llama/engines"
    ext = str(Path(tokenizer_dir).resolve())
    assert params(configs["preprocessing"])["tokenizer_dir"] == ext
    info = json.loads((repo / "triton_repo.json").read_text())
    assert info["external_paths"] == [ext] and info["model_repository"] == "/models/llama/triton"
    assert 'REPO="${TRITON_MODEL_REPO:-/models/llama/triton}"' in \
        (repo / "launch_triton.sh").read_text()

    repo = engine_repo(tmp_path / "b", tokenizer_dir, triton_model_root="/models",
                       triton_copy_tokenizer=True)
    configs = tr.validate_repo(repo)
    for m in ("preprocessing", "postprocessing"):
        assert params(configs[m])["tokenizer_dir"] == "/models/triton/preprocessing/1/tokenizer"
    assert (repo / "preprocessing" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((repo / "triton_repo.json").read_text())["external_paths"] == []


def test_add_triton_arguments_defaults_and_parsing():
    p = argparse.ArgumentParser()
    tr.add_triton_arguments(p)
    opts = tr.TritonOptions.from_any(p.parse_args([]))
    assert opts == tr.TritonOptions()
    assert (opts.triton_max_batch_size, opts.decoupled, opts.batching_strategy,
            opts.kv_cache_free_gpu_mem_fraction, opts.max_queue_delay_microseconds,
            opts.exclude_input_in_output, opts.triton_bls, opts.tokenizer_dir) == \
        (None, False, "inflight_fused_batching", 0.9, 0, True, False, None)
    args = p.parse_args(["--triton-max-batch-size", "8", "--decoupled", "--triton-bls",
                         "--tokenizer-dir", "/tok", "--no-exclude-input-in-output",
                         "--batching-strategy", "inflight_batching", "--triton-target",
                         "pytorch"])
    opts = tr.TritonOptions.from_any(argparse.Namespace(**vars(args), max_batch_size=4))
    assert (opts.triton_max_batch_size, opts.decoupled, opts.triton_bls, opts.tokenizer_dir,
            opts.exclude_input_in_output, opts.batching_strategy, opts.triton_target) == \
        (8, True, True, "/tok", False, "inflight_batching", "pytorch")
    assert tr.TritonOptions.from_any(p.parse_args([])).triton_target is None  # follows --target
    with pytest.raises(UserError, match="--triton-max-batch-size must be a whole number"):
        tr.TritonOptions.from_any({"triton_max_batch_size": 0})


# --- LLM-API (PyTorch) repository ----------------------------------------------------------------

@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_llmapi_repo(tmp_path, tokenizer_dir, tp, pp):
    hf = hf_dir(tmp_path, tokenizer_dir)
    opts = argparse.Namespace(decoupled=True, kv_cache_free_gpu_mem_fraction=0.8,
                              max_batch_size=32, max_seq_len=None, max_num_tokens=4096)
    repo = tr.write_llmapi_repo(tmp_path / "triton", model_dir=hf, tokenizer_dir=None, tp=tp,
                                pp=pp, options=opts)
    configs = tr.validate_repo(repo)
    assert set(configs) == {"tensorrt_llm"}
    cfg = configs["tensorrt_llm"]
    assert cfg.backend == "python" and cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled is True
    assert {"text_input", "streaming", "sampling_param_max_tokens"} <= {t.name for t in cfg.input}
    no_placeholders(repo)
    data = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert set(data) <= tr.LLMAPI_MODEL_YAML_KEYS
    assert data["model"] == str(hf.resolve()) and "tokenizer" not in data
    assert (data["tensor_parallel_size"], data["pipeline_parallel_size"]) == (tp, pp)
    assert data["backend"] == "pytorch"
    assert data["kv_cache_config"]["free_gpu_memory_fraction"] == 0.8
    assert (data["max_batch_size"], data["max_num_tokens"]) == (32, 4096)
    assert "max_seq_len" not in data
    assert data["triton_config"] == {"max_batch_size": 0, "decoupled": True}
    info = json.loads((repo / "triton_repo.json").read_text())
    assert info["world_size"] == tp * pp
    assert info["launch"] == tr.launch_command(str(repo), 1)  # LLM API spawns its own workers
    serve = info["trtllm_serve"]
    assert serve[:2] == ["trtllm-serve", str(hf.resolve())]
    assert serve[serve.index("--tp_size") + 1] == str(tp)
    assert serve[serve.index("--pp_size") + 1] == str(pp)
    subprocess.run(["bash", "-n", str(repo / "launch_triton.sh")], check=True)


def test_llmapi_model_yaml_is_checked(tmp_path, tokenizer_dir):
    hf = hf_dir(tmp_path, tokenizer_dir)
    repo = tr.write_llmapi_repo(tmp_path / "triton", model_dir=hf, tp=1, pp=1, options=None)
    yml = repo / "tensorrt_llm" / "1" / "model.yaml"
    good = yml.read_text()
    for bad, expect in [
        (good + "use_cuda_graph: true\n", "unknown key(s) use_cuda_graph"),
        (good.replace("free_gpu_memory_fraction", "free_gpu_mem_fraction"),
         "kv_cache_config has unknown key(s) free_gpu_mem_fraction"),
        (good.replace("  decoupled: false\n", ""), "triton_config lacks decoupled"),
        (good.replace("  decoupled: false", "  decoupled: true"), "differs from config.pbtxt"),
        (good.replace("tensor_parallel_size: 1", "tensor_parallel_size: 0"),
         "tensor_parallel_size must be"),
        ("model: [unclosed\n", "not valid YAML"),
    ]:
        yml.write_text(bad)
        with pytest.raises(UserError) as e:
            tr.validate_repo(repo)
        assert expect in _one_line(e) and "model.yaml" in str(e.value)
    yml.write_text(good)
    tr.validate_repo(repo)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(checkpoint_config()))
    with pytest.raises(UserError, match="needs the Hugging Face"):
        tr.write_llmapi_repo(tmp_path / "t2", model_dir=ckpt, tp=1, pp=1, options=None)
    with pytest.raises(UserError, match="no config.json"):
        tr.write_llmapi_repo(tmp_path / "t2", model_dir=tmp_path / "nothing", tp=1, pp=1,
                             options=None)
