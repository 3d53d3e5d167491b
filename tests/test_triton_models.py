"""The Triton repositories' Python models (pre/postprocessing, BLS, the ensemble, the LLM-API
model.py) run against a real tokenizer with the test doubles of triton_fakes.py: FakePbUtils for
triton_python_backend_utils, FakeTriton for the server's ensemble scheduling, FakeTrtllmBackend for
the C++ tensorrtllm backend, fake_tensorrt_llm for the tensorrt_llm package.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from builders import triton as tr
from triton_fakes import (PROMPTS, FakeRequest, FakeTriton, checkpoint_config, config_json,
                          engine_repo, fake_tensorrt_llm, hf_dir, init_model, load_model_py,
                          outputs_of, wait_finished)


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


def test_llmapi_model_py_with_fake_tensorrt_llm(tmp_path, tokenizer_dir, pb_utils, monkeypatch):
    """Our LLM-API model.py passes model.yaml (minus triton_config) to LLM(**kwargs) and answers
    requests through the response sender, whole or streamed."""
    trtllm = fake_tensorrt_llm()
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trtllm)
    hf = hf_dir(tmp_path, tokenizer_dir)
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
        wait_finished(req.sender)
        ((resp, flags),) = req.sender.sent
        out = outputs_of(resp)
        assert out["text_output"][0].decode() == PROMPTS[0]
        assert out["finish_reason"][0] == b"length" and flags == 1
        assert llm.calls[0][1] == {"max_tokens": 16, "stop": ["man"]}

        req = FakeRequest({"text_input": np.array([PROMPTS[1].encode()], dtype=object),
                           "streaming": np.array([True])})
        model.execute([req])
        wait_finished(req.sender)
        pieces = [outputs_of(r)["text_output"][0] for r, _ in req.sender.sent]
        assert len(pieces) == len(PROMPTS[1].split(" "))
        assert b"".join(pieces).decode() == PROMPTS[1]

        req = FakeRequest({"sampling_param_max_tokens": np.array([4], dtype=np.int32)})
        model.execute([req])
        wait_finished(req.sender)
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
