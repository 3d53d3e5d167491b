"""TEST DOUBLE — a CPU stand-in for the ``tensorrt_llm`` model (backend ``tensorrtllm``) of a
generated inflight_batcher_llm repository, so that a real tritonserver without GPUs or the
TensorRT-LLM backend can serve the rest of the repository unchanged.

tests/test_triton_server.py installs it as ``tensorrt_llm/1/model.py`` with the generated
config.pbtxt changed only in ``backend: "python"`` and two parameters (``standin_checkpoint_dir``:
the TRT-LLM checkpoint; ``standin_max_new_tokens_cap``): same model name, same inputs and outputs.

What it does, in the backend's terms: greedy decoding (argmax at every step) of each request's
``input_ids`` on the checkpoint with the CPU reference reader (verify/reference.py, which runs the
checkpoint rank by rank with TensorRT-LLM's semantics), up to ``request_output_len`` new tokens,
stopping at ``end_id`` (not returned, as TensorRT-LLM does not return it either) or after a
word of ``stop_words_list`` (returned, as TensorRT-LLM does). Outputs:
``output_ids`` [batch, beam=1, tokens] and ``sequence_length`` [batch, 1]; only the completion
when ``exclude_input_in_output`` (the request's value, else the model parameter). In decoupled
mode with ``streaming``, one response per new token, the last flagged final. Sampling, beams,
bad words, logits and the perf outputs are not implemented (they are not requested by the
tests). LoRA: a request's ``lora_task_id`` with ``lora_weights`` / ``lora_config`` runs with that
adapter (applied by verify/lora_reader.py as TensorRT-LLM's runtime applies them) and keeps it
under the task id; the task id alone reuses it; an unknown one without weights is an error
response with TensorRT-LLM's message.
"""
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from verify.lora_reader import LoraReferenceModel


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return np.asarray(tensor.as_numpy()).reshape(-1)[0].item()


def _word_list(tensor):
    """TensorRT-LLM's [batch, 2, width] word list (ids; end offsets, -1 padded) of row 0 ->
    [[token ids of word 0], ...]."""
    array = None if tensor is None else np.asarray(tensor.as_numpy())
    if array is None or array.size == 0:
        return []
    flat = array.reshape(-1, 2, array.shape[-1])[0]
    words, start = [], 0
    for end in flat[1]:
        if end < 0:
            break
        words.append([int(i) for i in flat[0][start:end]])
        start = int(end)
    return [w for w in words if w]


def _fp32_once(model):
    """Speed only: the reader casts each fp16/bf16 weight to its fp32 compute dtype at every use;
    casting them once up front gives the same values (the cast is exact) without the per-step
    cost."""
    for stage in model.ranks:
        for rank in stage:
            tensors = rank.tensors  # the reader holds this checkpoint in memory (not lazy)
            for key, value in tensors.items():
                if value.dtype in (torch.float16, torch.bfloat16):
                    tensors[key] = value.float()
    return model


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model = _fp32_once(LoraReferenceModel(params["standin_checkpoint_dir"], None,
                                                   lazy=False))
        self.adapters = {}  # the LoRA cache: task id -> the reader's rows
        self.cap = int(params.get("standin_max_new_tokens_cap", "64"))
        self.exclude_default = params.get("exclude_input_in_output", "true") == "true"
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def _greedy(self, prompt, max_new, end_id, stop_words=()):
        """Yields the new tokens one at a time (the whole sequence is rerun at each step: no KV
        cache, the reference reader is the point here, not speed)."""
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(min(max_new, self.cap)):
                logits = self.model.forward(torch.tensor([ids], dtype=torch.long))
                token = int(torch.argmax(logits[0, -1]).item())
                if end_id is not None and token == end_id:
                    return
                ids.append(token)
                yield token
                if any(ids[-len(w):] == w for w in stop_words):
                    return

    def _adapter(self, request):
        """The request's LoRA rows (verify/lora_reader.py, TensorRT-LLM's runtime rules): its
        tensors, kept under its task id, or the task id's cached ones; {} without a task id."""
        task = _scalar(request, "lora_task_id")
        if task is None:
            return {}
        weights = pb_utils.get_input_tensor_by_name(request, "lora_weights")
        config = pb_utils.get_input_tensor_by_name(request, "lora_config")
        if weights is not None and config is not None:
            w = torch.from_numpy(np.asarray(weights.as_numpy()[0], np.float32))
            c = np.asarray(config.as_numpy()[0], np.int32)
            self.adapters[task] = self.model.rows_of(w, c, where=f"LoRA task {task}")
        elif task not in self.adapters:  # TensorRT-LLM's PeftCacheManager message
            raise ValueError(f"LoRA task {task} not found in cache. Please send LoRA weights "
                             f"with request")
        return self.adapters[task]

    @staticmethod
    def _response(tokens):
        out = np.array([[tokens]], dtype=np.int32)          # [batch 1, beam 1, tokens]
        length = np.array([[len(tokens)]], dtype=np.int32)  # [batch 1, beam 1]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", out), pb_utils.Tensor("sequence_length", length)])

    def execute(self, requests):
        responses = []
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "input_lengths").as_numpy()
            n = int(lengths.reshape(-1)[0])
            prompt = [int(t) for t in ids.reshape(ids.shape[0], -1)[0][:n]]
            max_new = int(_scalar(request, "request_output_len"))
            end_id = _scalar(request, "end_id")
            exclude = bool(_scalar(request, "exclude_input_in_output", self.exclude_default))
            streaming = bool(_scalar(request, "streaming", False))
            try:
                self.model.lora = self._adapter(request)
            except ValueError as e:
                error = pb_utils.InferenceResponse(output_tensors=[],
                                                   error=pb_utils.TritonError(str(e)))
                if self.decoupled:
                    request.get_response_sender().send(error, flags=final)
                else:
                    responses.append(error)
                continue
            stop_words = _word_list(pb_utils.get_input_tensor_by_name(request,
                                                                      "stop_words_list"))
            tokens = self._greedy(prompt, max_new, end_id, stop_words)
            head = [] if exclude else prompt
            if not self.decoupled:
                responses.append(self._response(head + list(tokens)))
                continue
            sender = request.get_response_sender()
            if streaming:  # each new token as it comes, then an empty final response
                for token in tokens:
                    sender.send(self._response([token]))
                sender.send(flags=final)
            else:
                sender.send(self._response(head + list(tokens)), flags=final)
        return None if self.decoupled else responses
