"""TEST DOUBLE — a stand-in ``tensorrt_llm`` package for the generated LLM-API Triton model
(``tensorrt_llm/1/model.py``), so that a real tritonserver on CPU can run that model.py unchanged
(tests/test_triton_server.py puts this directory on the Python-backend stub's path).

It has what that model.py uses: ``LLM(**model.yaml arguments)`` and ``SamplingParams(**kw)``,
``LLM.generate_async(prompt, params, streaming)`` -> an async iterator of results with
``.outputs[0].text`` / ``.text_diff`` / ``.finish_reason`` and ``.finished``, ``LLM.shutdown()``.
Generation is greedy, on the served checkpoint (modelopt's unified HF checkpoint) through the CPU
reference reader (verify/reference.py), stopping at the tokenizer's eos token; only
``max_tokens`` of the sampling parameters is honoured. Nothing else of TensorRT-LLM exists here.
"""
import asyncio
import types

import torch
from transformers import AutoTokenizer

from verify.reference import ReferenceModel

__version__ = "0.0.0+test-double"


class SamplingParams:
    def __init__(self, max_tokens=16, **other):
        self.max_tokens = int(max_tokens)
        self.other = other


class LLM:
    def __init__(self, model, tokenizer=None, **llm_args):
        self.args = dict(llm_args, model=model, tokenizer=tokenizer)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model = ReferenceModel(model)
        for stage in self.model.ranks:  # speed only: the exact fp32 cast once, not at every use
            for rank in stage:
                tensors = rank.tensors  # held in memory (the reader is not lazy here)
                for key, value in tensors.items():
                    if value.dtype in (torch.float16, torch.bfloat16):
                        tensors[key] = value.float()

    def _tokens(self, prompt, max_tokens):
        ids = self.tokenizer(prompt).input_ids
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = self.model.forward(torch.tensor([ids], dtype=torch.long))
                token = int(torch.argmax(logits[0, -1]).item())
                if token == eos:
                    return
                ids.append(token)
                yield token

    def generate_async(self, prompt, params=None, streaming=False):
        params = params or SamplingParams()
        llm = self

        async def results():
            new, text = [], ""
            for token in llm._tokens(prompt, params.max_tokens):
                await asyncio.sleep(0)
                new.append(token)
                full = llm.tokenizer.decode(new, skip_special_tokens=True)
                diff, text = full[len(text):], full
                if streaming:
                    yield _result(text, diff, finished=False)
            yield _result(text, "", finished=True)

        return results()

    def shutdown(self):
        pass


def _result(text, diff, finished):
    out = types.SimpleNamespace(text=text, text_diff=diff, cumulative_logprob=None,
                                finish_reason="length" if finished else None, stop_reason=None)
    return types.SimpleNamespace(outputs=[out], finished=finished)
