"""Triton Python-backend model "tensorrt_llm_bls": the ensemble's pipeline as Business Logic
Scripting (preprocessing -> tensorrt_llm -> postprocessing, called with pb_utils.InferenceRequest).

Written by build_engine (builders/triton) into the Triton model repository, in the part
of tensorrtllm_backend's inflight_batcher_llm/tensorrt_llm_bls (text-only: no draft models). Its
inputs and outputs are the ensemble's (text_input, max_tokens, ... -> text_output, ...).
Where each input goes is the "input_routes" parameter: {input name: ["pre"|"llm", tensor name of
that model]}, written from the same table as the ensemble's input_map.

Streaming (stream=true) needs the decoupled transaction policy (build_engine --decoupled); each
response then carries the text added since the previous one: the tokens received so far are
decoded together, so characters split across tokens come out whole.

``triton_python_backend_utils`` exists only inside Triton's Python backend; tests put a stand-in
module under that name in ``sys.modules`` before loading this file.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

# preprocessing output -> tensorrt_llm input (the ensemble's intermediate tensors)
_PRE_TO_LLM = (("INPUT_ID", "input_ids"), ("REQUEST_INPUT_LEN", "input_lengths"),
               ("REQUEST_OUTPUT_LEN", "request_output_len"), ("OUT_END_ID", "end_id"),
               ("OUT_PAD_ID", "pad_id"), ("STOP_WORDS_IDS", "stop_words_list"),
               ("BAD_WORDS_IDS", "bad_words_list"))


def _parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return default if value == "" or value.startswith("${") else value


class TritonPythonModel:
    """Runs preprocessing, tensorrt_llm and postprocessing for each request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self.pre_model = _parameter(config, "preprocessing_model_name", "preprocessing")
        self.llm_model = _parameter(config, "tensorrt_llm_model_name", "tensorrt_llm")
        self.post_model = _parameter(config, "postprocessing_model_name", "postprocessing")
        routes = _parameter(config, "input_routes")
        if not routes:
            raise pb_utils.TritonModelException(
                "tensorrt_llm_bls: parameter input_routes is not set")
        self.routes = {name: tuple(route) for name, route in json.loads(routes).items()}
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                              for o in config.get("output", [])}
        self.passthrough = [n for n in self.output_dtypes if n != "text_output"]

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                sender = request.get_response_sender()
                try:
                    for response in self._generate(request):
                        sender.send(response)
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as e:
                    sender.send(self._error(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(list(self._generate(request))[-1])
            except Exception as e:
                responses.append(self._error(e))
        return responses

    def finalize(self):
        pass

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _error(e):
        return pb_utils.InferenceResponse(output_tensors=[],
                                          error=pb_utils.TritonError(f"tensorrt_llm_bls: {e}"))

    @staticmethod
    def _call(model, inputs, outputs):
        response = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs,
                                             inputs=inputs).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        found = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise RuntimeError(f"{model} returned no {name}")
            found[name] = tensor.as_numpy()
        return found

    def _route_inputs(self, request):
        """The request's inputs as (preprocessing inputs, tensorrt_llm inputs, streaming?)."""
        pre_inputs, llm_inputs, stream = [], [], False
        for name, (model, key) in self.routes.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            array = tensor.as_numpy()
            (pre_inputs if model == "pre" else llm_inputs).append(pb_utils.Tensor(key, array))
            if key == "streaming":
                stream = bool(np.asarray(array).any())
        return pre_inputs, llm_inputs, stream

    def _generate(self, request):
        pre_inputs, llm_inputs, stream = self._route_inputs(request)
        if stream and not self.decoupled:
            raise ValueError("stream=true needs the decoupled model (rebuild the repository "
                             "with --decoupled)")
        pre = self._call(self.pre_model, pre_inputs, [p for p, _ in _PRE_TO_LLM])
        llm_inputs += [pb_utils.Tensor(key, pre[out]) for out, key in _PRE_TO_LLM]
        request_llm = pb_utils.InferenceRequest(
            model_name=self.llm_model, inputs=llm_inputs,
            requested_output_names=["output_ids", "sequence_length"] + self.passthrough)
        llm_responses = (request_llm.exec(decoupled=True) if self.decoupled
                         else [request_llm.exec()])
        seen, shown = None, None  # streaming: tokens received and text sent so far
        for response in llm_responses:
            if response.has_error():
                raise RuntimeError(f"{self.llm_model}: {response.error().message()}")
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            lengths = pb_utils.get_output_tensor_by_name(response, "sequence_length")
            if ids is None or lengths is None:  # e.g. the empty final response of a stream
                continue
            ids, lengths = np.asarray(ids.as_numpy()), np.asarray(lengths.as_numpy())
            if ids.ndim == 2:
                ids = ids[:, None, :]
            lengths = lengths.reshape(ids.shape[0], ids.shape[1])
            if not stream:
                text = self._decode(ids, lengths)
            else:
                new = [[list(ids[b, k, :min(int(lengths[b, k]), ids.shape[2])])
                        for k in range(ids.shape[1])] for b in range(ids.shape[0])]
                seen = new if seen is None else [[a + n for a, n in zip(ra, rn)]
                                                 for ra, rn in zip(seen, new)]
                width = max(1, max(len(s) for row in seen for s in row))
                acc = np.zeros((len(seen), len(seen[0]), width), dtype=np.int32)
                acc_len = np.zeros((len(seen), len(seen[0])), dtype=np.int32)
                for b, row in enumerate(seen):
                    for k, s in enumerate(row):
                        acc[b, k, :len(s)] = s
                        acc_len[b, k] = len(s)
                full = self._decode(acc, acc_len)
                text = np.empty(full.shape, dtype=object)
                stable = np.empty(full.shape, dtype=object)
                for idx, now in np.ndenumerate(full):
                    # a character whose bytes have not all arrived decodes to U+FFFD: hold it back
                    now = now.decode("utf-8").rstrip("\ufffd")
                    before = "" if shown is None else shown[idx]
                    text[idx] = (now[len(before):] if now.startswith(before) else now).encode()
                    stable[idx] = now
                shown = stable
            outputs = [pb_utils.Tensor("text_output",
                                       text.astype(self.output_dtypes["text_output"]))]
            for name in self.passthrough:
                tensor = pb_utils.get_output_tensor_by_name(response, name)
                if tensor is not None:
                    outputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
            yield pb_utils.InferenceResponse(output_tensors=outputs)

    def _decode(self, ids, lengths):
        out = self._call(self.post_model, [pb_utils.Tensor("TOKENS_BATCH", ids.astype(np.int32)),
                                           pb_utils.Tensor("SEQUENCE_LENGTH",
                                                           lengths.astype(np.int32))], ["OUTPUT"])
        texts = np.asarray(out["OUTPUT"], dtype=object).reshape(ids.shape[0], ids.shape[1])
        return np.vectorize(lambda t: t if isinstance(t, bytes) else str(t).encode("utf-8"),
                            otypes=[object])(texts)
