"""Test doubles and helpers for the Triton repository tests (test_triton_repo.py,
test_triton_models.py, test_triton_tokens.py, test_triton_launch.py).

Triton itself cannot run in these tests (tests/test_triton_server.py runs a real one), so the
models' ``model.py`` files are executed with test doubles: ``FakePbUtils`` stands in for
``triton_python_backend_utils`` (which only exists inside tritonserver's Python backend),
``FakeTriton`` loads a written repository and runs its ensemble steps as Triton would, and
``FakeTrtllmBackend`` stands in for the C++ tensorrtllm backend (it "generates" by echoing the
prompt tokens, after checking every tensor against the tensorrt_llm config.pbtxt).
``fake_tensorrt_llm`` stands in for the tensorrt_llm package in the LLM-API model test. The
fixtures using them (``pb_utils``, ``tokenizer_dir``) are in conftest.py.
"""
from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import time
import types
from pathlib import Path

import numpy as np

from builders import triton as tr


AUSTEN_TEXT = Path(__file__).resolve().parent / "data" / "austen.txt"  # shipped, see data/README.md
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


# --- helpers ------------------------------------------------------------------------------------

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


def hf_dir(tmp_path, tokenizer_dir):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                               "model_type": "llama"}))
    for f in Path(tokenizer_dir).iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


# --- test double of the tensorrt_llm package (LLM API) ------------------------------------------

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


def wait_finished(sender, timeout=10.0):
    end = time.monotonic() + timeout
    while not sender.finished:
        assert time.monotonic() < end, "no final response"
        time.sleep(0.01)
