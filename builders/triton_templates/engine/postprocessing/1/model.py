"""Triton Python-backend model "postprocessing": token ids from "tensorrt_llm" -> text.

Written by build_engine (builders/triton) into the Triton model repository, in the part
of tensorrtllm_backend's inflight_batcher_llm/postprocessing, with the same tensor names:

inputs   TOKENS_BATCH [-1, -1] int32 (per request: [beams, tokens], the backend's output_ids),
         SEQUENCE_LENGTH [-1] int32 (per request: tokens of each beam, its sequence_length)
outputs  OUTPUT [-1] string (per request: the text of each beam, utf-8)

Parameters: tokenizer_dir (required), skip_special_tokens (default true), trust_remote_code
(default false). In streaming mode each response carries only the new tokens, which are
decoded on their own.

``triton_python_backend_utils`` exists only inside Triton's Python backend; tests put a stand-in
module under that name in ``sys.modules`` before loading this file.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

_TRUE = ("1", "true", "yes", "y", "t", "on")
_FALSE = ("0", "false", "no", "n", "f", "off")


def _parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return default if value == "" or value.startswith("${") else value


def _flag(model_config, key, default):
    value = _parameter(model_config, key)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"parameter {key}={value!r} is not a boolean")


class TritonPythonModel:
    """Detokenizes each beam of each request with the model's Hugging Face tokenizer."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        tokenizer_dir = _parameter(config, "tokenizer_dir")
        if not tokenizer_dir:
            raise pb_utils.TritonModelException(
                "postprocessing: parameter tokenizer_dir is not set")
        self.skip_special_tokens = _flag(config, "skip_special_tokens", True)
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=_flag(config, "trust_remote_code", False))
        out = pb_utils.get_output_config_by_name(config, "OUTPUT")
        self.output_dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = self._process(request)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
            except Exception as e:  # one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"postprocessing: {e}")))
        return responses

    def finalize(self):
        self.tokenizer = None

    def _process(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH")
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH")
        if tokens is None or lengths is None:
            raise ValueError("TOKENS_BATCH and SEQUENCE_LENGTH are required")
        tokens = np.asarray(tokens.as_numpy())
        lengths = np.asarray(lengths.as_numpy())
        if tokens.ndim == 2:  # [batch, tokens]: one beam
            tokens = tokens[:, None, :]
        batch, beams = tokens.shape[0], tokens.shape[1]
        lengths = lengths.reshape(batch, -1)
        texts = np.empty((batch, beams), dtype=object)
        for b in range(batch):
            for k in range(beams):
                n = int(lengths[b, k]) if k < lengths.shape[1] else tokens.shape[2]
                ids = [int(t) for t in tokens[b, k, :max(n, 0)]]
                texts[b, k] = self.tokenizer.decode(
                    ids, skip_special_tokens=self.skip_special_tokens).encode("utf-8")
        return texts.astype(self.output_dtype)
