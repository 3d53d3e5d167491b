"""Triton Python-backend model "tensorrt_llm" for current TensorRT-LLM (LLM API, PyTorch backend).

Written by build_engine (builders/triton) into the Triton model repository. It follows
the contract of NVIDIA/TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1/model.py
(whose model.py + helpers.py can be dropped in instead of this file):

* ``model.yaml`` beside this file: ``triton_config`` (max_batch_size, decoupled, optional
  cancellation_check_period_ms) is for Triton; every other key is passed to
  ``tensorrt_llm.LLM(**kwargs)`` (model, tensor_parallel_size, pipeline_parallel_size,
  kv_cache_config, ...), converted like trtllm-serve's extra options
  (``update_llm_args_with_extra_dict``).
* inputs: text_input [-1] string (one prompt), optional streaming, sampling_param_{max_tokens,
  temperature, top_k, top_p, frequency_penalty, presence_penalty, seed, best_of, stop,
  exclude_input_from_output} -> tensorrt_llm.SamplingParams, return_{finish_reason, stop_reason,
  cumulative_logprob} -> the outputs of the same names besides text_output.

Requests run concurrently on an asyncio loop thread (``LLM.generate_async``), so TensorRT-LLM's
scheduler batches them in flight; each response is sent with the request's response sender.
Streaming needs ``triton_config.decoupled: true``; each streamed response holds the new text.
With tensor/pipeline parallelism, TensorRT-LLM starts its GPU worker processes itself: run one
tritonserver process (see launch_triton.sh).

``triton_python_backend_utils`` exists only inside Triton's Python backend; tests put a stand-in
module under that name (and a stand-in ``tensorrt_llm``) in ``sys.modules`` first.
"""
import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
import yaml

MODEL_YAML = Path(__file__).resolve().with_name("model.yaml")
_SAMPLING = {f"sampling_param_{k}": k for k in (
    "max_tokens", "temperature", "top_k", "top_p", "frequency_penalty", "presence_penalty",
    "seed", "best_of", "exclude_input_from_output")}
_EXTRA_OUTPUTS = {"return_finish_reason": "finish_reason", "return_stop_reason": "stop_reason",
                  "return_cumulative_logprob": "cumulative_logprob"}


def load_model_yaml(path=MODEL_YAML):
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("triton_config"), dict):
        raise pb_utils.TritonModelException(f"{path}: expected LLM arguments and a triton_config")
    return data


def _scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = np.asarray(tensor.as_numpy())
    if value.size != 1:
        raise ValueError(f"{name} must hold one value (got shape {value.shape})")
    return value.reshape(-1)[0].item()


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    """Serves the model of model.yaml with tensorrt_llm.LLM."""

    @classmethod
    def auto_complete_config(cls, auto_complete_model_config):
        triton = load_model_yaml()["triton_config"]
        auto_complete_model_config.set_model_transaction_policy(
            dict(decoupled=bool(triton["decoupled"])))
        auto_complete_model_config.set_max_batch_size(int(triton["max_batch_size"]))
        return auto_complete_model_config

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        llm_args = load_model_yaml()
        triton = llm_args.pop("triton_config")
        llm_args.pop("logits_post_processors", None)  # upstream-only feature, not served here
        self.decoupled = bool(triton["decoupled"])
        out = pb_utils.get_output_config_by_name(model_config, "text_output")
        self.text_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        # The environment is left as tritonserver got it, as upstream's model.py does
        # (tensorrtllm_backend v0.19.0-v1.0.0 all_models/llmapi): launched by mpirun -n 1 like
        # upstream's launch_triton_server.py, TensorRT-LLM then spawns its tp x pp workers itself.
        from tensorrt_llm import LLM, SamplingParams

        try:
            from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_dict
        except ImportError:
            update_llm_args_with_extra_dict = None
        if update_llm_args_with_extra_dict is not None:
            llm_args = update_llm_args_with_extra_dict({}, llm_args)
        self._sampling_params = SamplingParams
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llmapi-loop",
                                       daemon=True)
        self.thread.start()
        self.llm = LLM(**llm_args)

    def execute(self, requests):
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
        return None  # responses go through each request's response sender

    def finalize(self):
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "shutdown"):
            llm.shutdown()
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            self.thread.join(timeout=10)

    # -- helpers --------------------------------------------------------------------------------

    def _parse(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
        if tensor is None:
            raise ValueError("text_input is missing")
        prompts = np.asarray(tensor.as_numpy(), dtype=object).reshape(-1)
        if prompts.size != 1:
            raise ValueError(f"text_input must hold one prompt (got {prompts.size})")
        params = {}
        for name, key in _SAMPLING.items():
            value = _scalar(request, name)
            if value is not None:
                params[key] = value
        stop = pb_utils.get_input_tensor_by_name(request, "sampling_param_stop")
        if stop is not None:
            params["stop"] = [_text(s) for s in np.asarray(stop.as_numpy(),
                                                          dtype=object).reshape(-1)]
        extras = [out for flag, out in _EXTRA_OUTPUTS.items() if _scalar(request, flag)]
        streaming = bool(_scalar(request, "streaming") or False)
        return _text(prompts[0]), params, streaming, extras

    def _response(self, output, extras, streaming):
        texts, finish, stop, logprob = [], [], [], []
        for o in output.outputs:
            text = getattr(o, "text_diff", None) if streaming else None
            texts.append((o.text if text is None else text).encode("utf-8"))
            finish.append(str(getattr(o, "finish_reason", None)).encode("utf-8"))
            stop.append(str(getattr(o, "stop_reason", None)).encode("utf-8"))
            logprob.append(getattr(o, "cumulative_logprob", None) or 0.0)
        tensors = [pb_utils.Tensor("text_output", np.array(texts, dtype=object)
                                   .astype(self.text_dtype))]
        values = {"finish_reason": np.array(finish, dtype=object),
                  "stop_reason": np.array(stop, dtype=object),
                  "cumulative_logprob": np.array(logprob, dtype=np.float32)}
        tensors += [pb_utils.Tensor(name, values[name]) for name in extras]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    async def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, params, streaming, extras = self._parse(request)
            if streaming and not self.decoupled:
                raise ValueError("streaming needs triton_config.decoupled: true in model.yaml "
                                 "(and model_transaction_policy decoupled in config.pbtxt)")
            result = self.llm.generate_async(prompt, self._sampling_params(**params),
                                             streaming=streaming)
            last, done = None, False
            async for output in result:
                last = output
                if streaming:
                    done = bool(getattr(output, "finished", False))
                    sender.send(self._response(output, extras, True), flags=final if done else 0)
            if not streaming:
                if last is None:
                    raise RuntimeError("TensorRT-LLM returned no output")
                sender.send(self._response(last, extras, False), flags=final)
            elif not done:
                sender.send(flags=final)
        except Exception as e:
            sender.send(pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"tensorrt_llm: {e}")), flags=final)
