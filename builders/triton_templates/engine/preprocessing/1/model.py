"""Triton Python-backend model "preprocessing": prompt text -> token ids for "tensorrt_llm".

Written by build_engine (builders/triton) into the Triton model repository. It plays the
part of tensorrtllm_backend's inflight_batcher_llm/preprocessing for text-only decoder models,
with the same tensor names (see config.pbtxt beside the version directory):

inputs   QUERY [1] string, REQUEST_OUTPUT_LEN [1] int32, optional BAD_WORDS_DICT / STOP_WORDS_DICT
         [-1] string, END_ID / PAD_ID [1] int32
outputs  INPUT_ID [-1] int32 (right-padded with the pad id), REQUEST_INPUT_LEN [1] int32,
         REQUEST_OUTPUT_LEN [-1] int32, BAD_WORDS_IDS / STOP_WORDS_IDS [2, -1] int32 (TensorRT-LLM's
         word-list format: row 0 the concatenated token ids, row 1 the end offset of each word,
         both padded, ids with 0 and offsets with -1), OUT_END_ID / OUT_PAD_ID [1] int32

Parameters: tokenizer_dir (required), add_special_tokens (default true), max_input_len (0: no
check), trust_remote_code (default false), end_id / pad_id / stop_token_ids (a JSON list): the
model's own, written by build_engine from the tokenizer and generation_config.json. END_ID and
PAD_ID default to end_id and pad_id (without them: the tokenizer's eos token, -1 if it has none,
and its pad token, else END_ID). Each of stop_token_ids (the model's other eos tokens, e.g.
Llama-3's <|eot_id|> beside <|end_of_text|>) is added to every request's stop words, so
generation stops where Hugging Face's generate stops.

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


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    """Tokenizes each request's QUERY rows with the model's Hugging Face tokenizer."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        tokenizer_dir = _parameter(config, "tokenizer_dir")
        if not tokenizer_dir:
            raise pb_utils.TritonModelException("preprocessing: parameter tokenizer_dir is not set")
        self.add_special_tokens = _flag(config, "add_special_tokens", True)
        self.max_input_len = int(_parameter(config, "max_input_len", "0")) or None
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=_flag(config, "trust_remote_code", False))
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.end_id = int(_parameter(config, "end_id", -1 if eos is None else eos))
        self.pad_id = int(_parameter(config, "pad_id", pad if pad is not None else (
            self.end_id if self.end_id >= 0 else 0)))
        self.stop_token_ids = [int(i) for i in json.loads(_parameter(config, "stop_token_ids",
                                                                      "[]"))]
        self.dtypes = {}
        for name in ("INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN", "BAD_WORDS_IDS",
                     "STOP_WORDS_IDS", "OUT_END_ID", "OUT_PAD_ID"):
            out = pb_utils.get_output_config_by_name(config, name)
            self.dtypes[name] = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self._process(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as e:  # one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"preprocessing: {e}")))
        return responses

    def finalize(self):
        self.tokenizer = None

    # -- helpers --------------------------------------------------------------------------------

    def _tensor(self, name, array):
        return pb_utils.Tensor(name, np.asarray(array).astype(self.dtypes[name]))

    @staticmethod
    def _input(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _per_row(self, request, name, batch, default):
        value = self._input(request, name)
        if value is None:
            return np.full((batch, 1), default, dtype=np.int64)
        return np.asarray(value).reshape(batch, -1)[:, :1]

    def _process(self, request):
        query = self._input(request, "QUERY")
        if query is None:
            raise ValueError("QUERY is missing")
        batch = query.shape[0]
        prompts = [_text(row) for row in np.asarray(query, dtype=object).reshape(batch, -1)[:, 0]]
        ids = [self.tokenizer.encode(p, add_special_tokens=self.add_special_tokens)
               for p in prompts]
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if self.max_input_len and len(seq) > self.max_input_len:
                raise ValueError(f"prompt {i} has {len(seq)} tokens; the engine takes at most "
                                 f"{self.max_input_len} (max_input_len)")
        output_len = self._input(request, "REQUEST_OUTPUT_LEN")
        if output_len is None:
            raise ValueError("REQUEST_OUTPUT_LEN is missing")
        end_id = self._per_row(request, "END_ID", batch, self.end_id)
        pad_id = self._per_row(request, "PAD_ID", batch, self.pad_id)
        width = max(len(seq) for seq in ids)
        input_ids = np.empty((batch, width), dtype=np.int64)
        for i, seq in enumerate(ids):
            input_ids[i, :len(seq)] = seq
            input_ids[i, len(seq):] = pad_id[i, 0]
        lengths = np.array([[len(seq)] for seq in ids])
        return [
            self._tensor("INPUT_ID", input_ids),
            self._tensor("REQUEST_INPUT_LEN", lengths),
            self._tensor("REQUEST_OUTPUT_LEN", np.asarray(output_len).reshape(batch, -1)),
            self._tensor("BAD_WORDS_IDS", self._word_lists(
                self._input(request, "BAD_WORDS_DICT"), batch)),
            self._tensor("STOP_WORDS_IDS", self._word_lists(
                self._input(request, "STOP_WORDS_DICT"), batch, self.stop_token_ids)),
            self._tensor("OUT_END_ID", end_id),
            self._tensor("OUT_PAD_ID", pad_id),
        ]

    def _word_lists(self, words, batch, token_words=()):
        """[batch, n] strings (and one-token words ``token_words`` for every row) -> [batch, 2,
        width] int32 in TensorRT-LLM's word-list format."""
        if words is None and not token_words:
            return np.zeros((batch, 2, 0), dtype=np.int32)
        words = (np.zeros((batch, 0), dtype=object) if words is None
                 else np.asarray(words, dtype=object).reshape(batch, -1))
        flat, offsets = [], []
        for row in words:
            ids, ends = [], []
            encoded = [self.tokenizer.encode(_text(w), add_special_tokens=False) for w in row]
            for tokens in encoded + [[t] for t in token_words]:
                if tokens:
                    ids += tokens
                    ends.append(len(ids))
            flat.append(ids)
            offsets.append(ends)
        width = max(1, max(len(x) for x in flat))
        out = np.zeros((batch, 2, width), dtype=np.int32)
        out[:, 1, :] = -1
        for i, (ids, ends) in enumerate(zip(flat, offsets)):
            out[i, 0, :len(ids)] = ids
            out[i, 1, :len(ends)] = ends
        return out
