"""Triton model repositories (builders/triton/): schema, values, validation, and the
pre/postprocessing, BLS and LLM-API model.py files run against a real tokenizer.

Triton itself cannot run here, so the models' ``model.py`` files are executed with test doubles:
``FakePbUtils`` stands in for ``triton_python_backend_utils`` (which only exists inside
tritonserver's Python backend), ``FakeTriton`` loads a written repository and runs its ensemble
steps as Triton would, and ``FakeTrtllmBackend`` stands in for the C++ tensorrtllm backend (it
"generates" by echoing the prompt tokens, after checking every tensor against the tensorrt_llm
config.pbtxt). ``fake_tensorrt_llm`` stands in for the tensorrt_llm package in the LLM-API test.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from builders import triton as tr
from convert.errors import UserError

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"
PROMPTS = ["It is a truth universally acknowledged, that a single man",
           "Ünïcödé – “quotes” and emoji 😀 survive the round trip."]
_TRITON_NP = {"TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_INT32": np.int32,
              "TYPE_INT64": np.int64, "TYPE_UINT64": np.uint64, "TYPE_FP16": np.float16,
              "TYPE_FP32": np.float32, "TYPE_BF16": np.float32, "TYPE_STRING": np.object_}


# --- test double of triton_python_backend_utils -------------------------------------------------

class FakePbUtils(types.ModuleType):
    """Test double of Triton's ``triton_python_backend_utils`` module (the API subset our
    model.py files use). ``runtime`` (a FakeTriton) answers BLS ``InferenceRequest.exec``."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    runtime = None

    class TritonModelException(Exception):
        pass

    class TritonError:
        CANCELLED = 1

        def __init__(self, msg, code=None):
            self._msg = msg

        def message(self):
            return self._msg

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

        def is_cpu(self):
            return True

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self._outputs, self._error = list(output_tensors or []), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names=None, inputs=None, **_):
            self.model_name, self.requested = model_name, list(requested_output_names or [])
            self.tensors = list(inputs or [])

        def exec(self, decoupled=False):
            responses = FakePbUtils.runtime.infer(
                self.model_name, {t.name(): t.as_numpy() for t in self.tensors}, self.requested)
            return iter(responses) if decoupled else responses[-1]

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs() if t.name() == name), None)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)

    @staticmethod
    def get_output_config_by_name(model_config, name):
        return next((o for o in model_config.get("output", []) if o["name"] == name), None)

    @staticmethod
    def triton_string_to_numpy(data_type):
        return _TRITON_NP[data_type]


class FakeSender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    @property
    def finished(self):
        return any(f == FakePbUtils.TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, f in self.sent)


class FakeRequest:
    def __init__(self, tensors: dict):
        self._inputs = [FakePbUtils.Tensor(k, v) for k, v in tensors.items()]
        self.sender = FakeSender()

    def inputs(self):
        return self._inputs

    def get_response_sender(self):
        return self.sender

    def request_id(self):
        return ""


def outputs_of(response) -> dict:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


@pytest.fixture
def pb_utils(monkeypatch):
    fake = FakePbUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    yield fake
    FakePbUtils.runtime = None


_loaded = itertools.count()


def load_model_py(path: Path):
    """Import a repository's model.py as a fresh module (the stand-in pb_utils must be in
    sys.modules already)."""
    spec = importlib.util.spec_from_file_location(f"_triton_model_{next(_loaded)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_json(repo: Path, model: str) -> str:
    """The model config as Triton hands it to a Python model's initialize (JSON of the proto)."""
    from google.protobuf import json_format

    cfg = tr.parse_config((repo / model / "config.pbtxt").read_text(), model)
    return json_format.MessageToJson(cfg, preserving_proto_field_name=True)


def init_model(repo: Path, model: str):
    module = load_model_py(repo / model / "1" / "model.py")
    instance = module.TritonPythonModel()
    instance.initialize({"model_config": config_json(repo, model), "model_name": model,
                         "model_repository": str(repo / model), "model_version": "1"})
    return instance


# --- test double of the C++ tensorrtllm backend and of Triton's scheduler -----------------------

class FakeTrtllmBackend:
    """Test double of Triton's C++ tensorrtllm backend: checks each request against the
    tensorrt_llm config.pbtxt (declared names, data types, required inputs) and "generates"
    by echoing the prompt's tokens (at most request_output_len of them), one response per token
    when streaming."""

    def __init__(self, config):
        pb2 = tr.model_config_pb2()
        self.inputs = {t.name: (pb2.DataType.Name(t.data_type), t.optional) for t in config.input}
        self.outputs = {t.name for t in config.output}
        self.decoupled = config.model_transaction_policy.decoupled
        self.exclude_input = config.parameters["exclude_input_in_output"].string_value == "true"
        self.requests = []

    def infer(self, tensors: dict) -> list:
        for name, array in tensors.items():
            assert name in self.inputs, f"tensorrt_llm has no input {name}"
            expected = _TRITON_NP[self.inputs[name][0]]
            assert np.asarray(array).dtype == expected, (name, np.asarray(array).dtype, expected)
        missing = [n for n, (_, opt) in self.inputs.items() if not opt and n not in tensors]
        assert not missing, f"required inputs missing: {missing}"
        self.requests.append(tensors)
        ids = np.asarray(tensors["input_ids"])
        lengths = np.asarray(tensors["input_lengths"]).reshape(-1)
        out_len = np.asarray(tensors["request_output_len"]).reshape(-1)
        streaming = bool(np.asarray(tensors.get("streaming", False)).any())
        assert not streaming or self.decoupled, "streaming needs the decoupled model"
        gens = [list(ids[b, :lengths[b]])[:out_len[b]] for b in range(ids.shape[0])]
        if streaming:
            assert ids.shape[0] == 1
            return [self._response([[tok]]) for tok in gens[0]]
        full = [(list(ids[b, :lengths[b]]) if not self.exclude_input else []) + g
                for b, g in enumerate(gens)]
        return [self._response(full)]

    def _response(self, seqs):
        width = max(1, max(len(s) for s in seqs))
        out = np.zeros((len(seqs), 1, width), dtype=np.int32)
        for b, s in enumerate(seqs):
            out[b, 0, :len(s)] = s
        lengths = np.array([[len(s)] for s in seqs], dtype=np.int32)
        cum = np.zeros((len(seqs), 1), dtype=np.float32)
        return FakePbUtils.InferenceResponse([FakePbUtils.Tensor("output_ids", out),
                                              FakePbUtils.Tensor("sequence_length", lengths),
                                              FakePbUtils.Tensor("cum_log_probs", cum)])


class FakeTriton:
    """Test double of tritonserver for one repository: Python models run their model.py,
    tensorrt_llm is a FakeTrtllmBackend, and the ensemble's steps are followed as Triton's
    ensemble scheduler follows them (input_map/output_map of the parsed config.pbtxt)."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.configs = tr.validate_repo(repo)
        self.models = {}
        for name, cfg in self.configs.items():
            if cfg.backend == "python":
                self.models[name] = init_model(repo, name)
            elif cfg.backend == "tensorrtllm":
                self.models[name] = FakeTrtllmBackend(cfg)
        FakePbUtils.runtime = self

    def infer(self, model: str, tensors: dict, requested=None) -> list:
        instance = self.models[model]
        if isinstance(instance, FakeTrtllmBackend):
            return instance.infer(tensors)
        request = FakeRequest(tensors)
        result = instance.execute([request])
        if result is None:  # decoupled: responses went through the sender
            return [r for r, _ in request.sender.sent if r is not None]
        return result

    def ensemble(self, tensors: dict, name: str = tr.ENSEMBLE) -> dict:
        cfg = self.configs[name]
        values = dict(tensors)
        for step in cfg.ensemble_scheduling.step:
            feed = {k: values[v] for k, v in step.input_map.items() if v in values}
            response = self.infer(step.model_name, feed, list(step.output_map))[-1]
            got = outputs_of(response)
            for key, value in step.output_map.items():
                if key in got:
                    values[value] = got[key]
        return {t.name: values[t.name] for t in cfg.output if t.name in values}


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A real Hugging Face tokenizer directory: a byte-level BPE trained here on Austen (or a
    built-in text), with <s> added in front of every prompt, wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = (SHARED_TEXT.read_text(encoding="utf-8", errors="replace")[:200_000]
            if SHARED_TEXT.exists() else " ".join(PROMPTS) * 50).splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    d = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(d)
    return d


def checkpoint_config(tp=1, pp=1, **extra):
    cfg = {"architecture": "LlamaForCausalLM", "dtype": "float16", "logits_dtype": "float32",
           "vocab_size": 1000, "max_position_embeddings": 2048, "num_hidden_layers": 4,
           "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}}
    cfg.update(extra)
    return cfg


def engine_repo(tmp_path, tokenizer_dir, *, tp=1, build=None, **options):
    out = tmp_path / "out"
    ec = tr.engine_config_from_checkpoint(checkpoint_config(tp), build or {})
    repo = tr.write_engine_repo(out / "triton", engine_dir=out / "engines",
                                tokenizer_dir=tokenizer_dir, engine_config=ec, options=options)
    return repo


def params(cfg) -> dict:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def no_placeholders(repo: Path):
    for f in repo.rglob("*"):
        if f.is_file() and f.suffix in (".pbtxt", ".yaml", ".sh", ".json"):
            text = f.read_text()
            for shell_var in ("${TRITON_MODEL_REPO", "${TRITONSERVER", "${1:-", "${SLURM_PROCID"):
                text = text.replace(shell_var, "")  # launch_triton.sh's own bash expansions
            assert "${" not in text, f


# --- repository contents ------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 3])
def test_engine_repo_from_real_checkpoint_config(tmp_path, tokenizer_dir, tiny_model, tp):
    """tp 1 and tp 3: the checkpoint config comes from this project's converter (a tiny Llama
    with 6 heads), the build options from the engine flags; every config.pbtxt parses with
    Triton's schema and carries the right values."""
    from convert.hf_config import from_hugging_face, read_hf_config

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
    engine_repo(tmp_path, tokenizer_dir, force=True)
    assert not marker.exists() and tr.validate_repo(repo)
    assert sorted(p.name for p in repo.parent.iterdir()) == ["triton"]  # no temp dirs left


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


# --- the Python models, run with the test doubles ------------------------------------------------

def _query(texts, max_tokens=64):
    return {"QUERY": np.array([[t.encode()] for t in texts], dtype=object),
            "REQUEST_OUTPUT_LEN": np.full((len(texts), 1), max_tokens, dtype=np.int32)}


def test_pre_and_postprocessing_round_trip_text(tmp_path, tokenizer_dir, pb_utils):
    """text → preprocessing → ids → postprocessing → the same text, through a real tokenizer,
    batched (two prompts of different lengths, padded) and as separate requests."""
    from transformers import AutoTokenizer

    repo = engine_repo(tmp_path, tokenizer_dir)
    pre, post = init_model(repo, "preprocessing"), init_model(repo, "postprocessing")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)

    batched = FakeRequest(_query(PROMPTS))
    single = FakeRequest(_query(PROMPTS[:1]))
    r_batched, r_single = pre.execute([batched, single])
    out = outputs_of(r_batched)
    assert out["INPUT_ID"].dtype == np.int32 and out["REQUEST_INPUT_LEN"].dtype == np.int32
    lengths = out["REQUEST_INPUT_LEN"].reshape(-1)
    for i, text in enumerate(PROMPTS):
        expected = hf.encode(text)
        assert expected[0] == hf.bos_token_id
        assert list(out["INPUT_ID"][i, :lengths[i]]) == expected
        assert all(out["INPUT_ID"][i, lengths[i]:] == hf.pad_token_id)
    assert out["OUT_END_ID"].tolist() == [[hf.eos_token_id]] * 2
    assert out["OUT_PAD_ID"].tolist() == [[hf.pad_token_id]] * 2
    assert out["REQUEST_OUTPUT_LEN"].tolist() == [[64], [64]]
    assert out["STOP_WORDS_IDS"].shape == (2, 2, 0)
    assert outputs_of(r_single)["INPUT_ID"].shape == (1, lengths[0])

    tokens = out["INPUT_ID"][:, None, :]  # [batch, beam, tokens], as tensorrt_llm returns them
    seq = out["REQUEST_INPUT_LEN"].reshape(2, 1)
    (r_post,) = post.execute([FakeRequest({"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": seq})])
    text = outputs_of(r_post)["OUTPUT"]
    assert text.shape == (2, 1)
    assert [t.decode("utf-8") for t in text[:, 0]] == PROMPTS  # <s> and padding dropped


def test_preprocessing_word_lists_ids_and_errors(tmp_path, tokenizer_dir, pb_utils):
    from transformers import AutoTokenizer

    repo = engine_repo(tmp_path, tokenizer_dir, build={"max_input_len": 8})
    pre = init_model(repo, "preprocessing")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    tensors = _query(["a single man", "truth"])
    tensors["STOP_WORDS_DICT"] = np.array([[b"man", b" in"], [b"", b""]], dtype=object)
    tensors["END_ID"] = np.array([[7], [9]], dtype=np.int32)
    (r,) = pre.execute([FakeRequest(tensors)])
    out = outputs_of(r)
    stop = out["STOP_WORDS_IDS"]
    man, inn = (hf.encode(w, add_special_tokens=False) for w in ("man", " in"))
    assert stop.shape == (2, 2, len(man) + len(inn))
    assert list(stop[0, 0]) == man + inn
    assert list(stop[0, 1, :2]) == [len(man), len(man) + len(inn)]
    assert list(stop[1, 1]) == [-1] * stop.shape[2]  # empty words: no entry
    assert out["BAD_WORDS_IDS"].shape == (2, 2, 0)
    assert out["OUT_END_ID"].tolist() == [[7], [9]]

    too_long = FakeRequest(_query(["one two three four five six seven eight nine ten"]))
    ok = FakeRequest(_query(["fine"]))
    bad, good = pre.execute([too_long, ok])
    assert bad.has_error() and "max_input_len" in bad.error().message()
    assert not good.has_error()  # one bad request does not fail the batch


def test_ensemble_end_to_end_with_fake_backend(tmp_path, tokenizer_dir, pb_utils):
    """The whole ensemble as Triton runs it (steps from the parsed config.pbtxt), with the C++
    backend replaced by FakeTrtllmBackend, which echoes the prompt tokens: text_output must be
    the prompt, and every tensor that reached tensorrt_llm had a declared name and data type."""
    repo = engine_repo(tmp_path, tokenizer_dir)
    triton = FakeTriton(repo)
    result = triton.ensemble({
        "text_input": np.array([[PROMPTS[1].encode()]], dtype=object),
        "max_tokens": np.array([[200]], dtype=np.int32),
        "stop_words": np.array([[b"end"]], dtype=object),
        "temperature": np.array([[0.5]], dtype=np.float32),
        "top_k": np.array([[4]], dtype=np.int32)})
    assert result["text_output"][0, 0].decode() == PROMPTS[1]
    assert "cum_log_probs" in result
    sent = triton.models["tensorrt_llm"].requests[0]
    assert {"input_ids", "input_lengths", "request_output_len", "end_id", "pad_id",
            "stop_words_list", "bad_words_list", "temperature", "runtime_top_k"} <= set(sent)


def test_bls_model_non_streaming_and_streaming(tmp_path, tokenizer_dir, pb_utils):
    """tensorrt_llm_bls calls preprocessing, tensorrt_llm and postprocessing through
    pb_utils.InferenceRequest; decoupled, it streams the text piece by piece."""
    repo = engine_repo(tmp_path, tokenizer_dir, triton_bls=True)
    configs = tr.validate_repo(repo)
    assert {t.name for t in configs["tensorrt_llm_bls"].input} == \
        {t.name for t in configs["ensemble"].input}
    triton = FakeTriton(repo)
    request = {"text_input": np.array([[PROMPTS[0].encode()]], dtype=object),
               "max_tokens": np.array([[100]], dtype=np.int32)}
    (response,) = triton.infer("tensorrt_llm_bls", request)
    assert outputs_of(response)["text_output"][0, 0].decode() == PROMPTS[0]
    (response,) = triton.infer("tensorrt_llm_bls", dict(request, stream=np.array([[True]])))
    assert response.has_error() and "decoupled" in response.error().message()

    repo = engine_repo(tmp_path / "d", tokenizer_dir, triton_bls=True, decoupled=True)
    triton = FakeTriton(repo)
    req = FakeRequest(dict(request, text_input=np.array([[PROMPTS[1].encode()]], dtype=object),
                           stream=np.array([[True]])))
    assert triton.models["tensorrt_llm_bls"].execute([req]) is None
    pieces = [outputs_of(r)["text_output"][0, 0] for r, _ in req.sender.sent if r is not None]
    assert len(pieces) > 3 and req.sender.finished
    assert b"".join(pieces).decode("utf-8") == PROMPTS[1]  # multi-byte characters stay whole


@pytest.mark.slow
def test_round_trip_with_smollm2_tokenizer(tmp_path, pb_utils, request):
    """The same round trip with the real SmolLM2 tokenizer (when examples.smollm2 exists)."""
    pytest.importorskip("examples.smollm2")
    hf_dir = request.getfixturevalue("smollm2_dir")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(hf_dir))
    ec = tr.engine_config_from_checkpoint(checkpoint_config(vocab_size=vocab), {})
    repo = tr.write_engine_repo(tmp_path / "triton", engine_dir=tmp_path / "engines",
                                tokenizer_dir=hf_dir, engine_config=ec)
    triton = FakeTriton(repo)
    for text in PROMPTS:
        result = triton.ensemble({"text_input": np.array([[text.encode()]], dtype=object),
                                  "max_tokens": np.array([[256]], dtype=np.int32)})
        assert result["text_output"][0, 0].decode() == text


# --- LLM-API (PyTorch) repository ----------------------------------------------------------------

def _hf_dir(tmp_path, tokenizer_dir):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                               "model_type": "llama"}))
    for f in Path(tokenizer_dir).iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_llmapi_repo(tmp_path, tokenizer_dir, tp, pp):
    hf = _hf_dir(tmp_path, tokenizer_dir)
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
    hf = _hf_dir(tmp_path, tokenizer_dir)
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


class _FakeCompletion:
    def __init__(self, text, diff):
        self.text, self.text_diff = text, diff
        self.finish_reason, self.stop_reason, self.cumulative_logprob = "length", None, -1.5


def fake_tensorrt_llm():
    """Test double of the tensorrt_llm package: LLM records its kwargs; generate_async yields
    the prompt back word by word."""
    mod = types.ModuleType("tensorrt_llm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        instances = []

        def __init__(self, **kw):
            self.kwargs, self.calls = kw, []
            LLM.instances.append(self)

        def generate_async(self, prompt, params, streaming=False):
            self.calls.append((prompt, params.kw, streaming))
            words = prompt.split(" ")

            class Result:
                def __aiter__(self_inner):
                    return self_inner._gen()

                async def _gen(self_inner):
                    for i in range(len(words)):
                        await asyncio.sleep(0)
                        done = i == len(words) - 1
                        text = " ".join(words[:i + 1])
                        diff = (" " if i else "") + words[i]
                        yield types.SimpleNamespace(outputs=[_FakeCompletion(text, diff)],
                                                    finished=done)
            return Result()

        def shutdown(self):
            pass

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def _wait(sender, timeout=10.0):
    end = time.monotonic() + timeout
    while not sender.finished:
        assert time.monotonic() < end, "no final response"
        time.sleep(0.01)


def test_llmapi_model_py_with_fake_tensorrt_llm(tmp_path, tokenizer_dir, pb_utils, monkeypatch):
    """Our LLM-API model.py passes model.yaml (minus triton_config) to LLM(**kwargs) and answers
    requests through the response sender, whole or streamed."""
    trtllm = fake_tensorrt_llm()
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trtllm)
    hf = _hf_dir(tmp_path, tokenizer_dir)
    repo = tr.write_llmapi_repo(tmp_path / "triton", model_dir=hf, tp=2, pp=1,
                                options={"decoupled": True})
    model = init_model(repo, "tensorrt_llm")
    try:
        (llm,) = trtllm.LLM.instances
        assert llm.kwargs["model"] == str(hf.resolve())
        assert llm.kwargs["tensor_parallel_size"] == 2 and "triton_config" not in llm.kwargs

        req = FakeRequest({"text_input": np.array([PROMPTS[0].encode()], dtype=object),
                           "sampling_param_max_tokens": np.array([16], dtype=np.int32),
                           "sampling_param_stop": np.array([b"man"], dtype=object),
                           "return_finish_reason": np.array([True])})
        assert model.execute([req]) is None
        _wait(req.sender)
        ((resp, flags),) = req.sender.sent
        out = outputs_of(resp)
        assert out["text_output"][0].decode() == PROMPTS[0]
        assert out["finish_reason"][0] == b"length" and flags == 1
        assert llm.calls[0][1] == {"max_tokens": 16, "stop": ["man"]}

        req = FakeRequest({"text_input": np.array([PROMPTS[1].encode()], dtype=object),
                           "streaming": np.array([True])})
        model.execute([req])
        _wait(req.sender)
        pieces = [outputs_of(r)["text_output"][0] for r, _ in req.sender.sent]
        assert len(pieces) == len(PROMPTS[1].split(" "))
        assert b"".join(pieces).decode() == PROMPTS[1]

        req = FakeRequest({"sampling_param_max_tokens": np.array([4], dtype=np.int32)})
        model.execute([req])
        _wait(req.sender)
        assert req.sender.sent[0][0].has_error()
    finally:
        model.finalize()

    class FakeAutoCompleteConfig:
        """Test double of pb_utils.ModelConfig: refuses to change a decoupled flag that the
        config.pbtxt already sets, as Triton's does."""

        def __init__(self, cfg):
            self.cfg = json.loads(cfg)

        def set_model_transaction_policy(self, policy):
            old = self.cfg.get("model_transaction_policy", {}).get("decoupled")
            assert old is None or old == policy["decoupled"], "decoupled changed"

        def set_max_batch_size(self, n):
            assert self.cfg.get("max_batch_size", 0) <= n

    module = load_model_py(repo / "tensorrt_llm" / "1" / "model.py")
    module.TritonPythonModel.auto_complete_config(
        FakeAutoCompleteConfig(config_json(repo, "tensorrt_llm")))
