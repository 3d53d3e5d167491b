"""end_id / pad_id / default stop words from the model's tokenizer and generation_config.json
(builders/triton/tokens.py), into the Triton configs, triton_repo.json and the preprocessing
model's outputs — with a model whose generation_config lists several eos ids, as Llama-3's does
(``<|end_of_text|>`` and ``<|eot_id|>``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from builders import triton as tr
from builders.triton.tokens import special_token_ids
from common.errors import UserError
from triton_fakes import FakeRequest, checkpoint_config, init_model, outputs_of, params


def _llama3_like(src: Path, dst: Path, *, eos_token: str, generation_eos: list[str],
                 pad_in_generation=False) -> dict:
    """The fixture tokenizer plus Llama-3's two end tokens as special tokens, with
    generation_config.json listing ``generation_eos``; returns {token: id}."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_special_tokens({"additional_special_tokens": ["<|end_of_text|>", "<|eot_id|>"]})
    tok.eos_token = eos_token
    tok.pad_token = None
    tok.save_pretrained(dst)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<pad>")}
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": [ids[t] for t in generation_eos]}
    if pad_in_generation:
        gen["pad_token_id"] = ids["<pad>"]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return ids


def test_several_eos_ids_become_end_id_and_stop_words(tmp_path, tokenizer_dir, pb_utils):
    tok_dir = tmp_path / "llama3_tok"
    ids = _llama3_like(tokenizer_dir, tok_dir, eos_token="<|end_of_text|>",
                       generation_eos=["<|end_of_text|>", "<|eot_id|>"])
    eot, end = ids["<|eot_id|>"], ids["<|end_of_text|>"]
    assert special_token_ids(tok_dir) == {"end_id": end, "pad_id": end, "stop_token_ids": [eot],
                                          "eos_token_ids": [end, eot]}

    out = tmp_path / "out"
    ec = tr.engine_config_from_checkpoint(checkpoint_config(), {})
    repo = tr.write_engine_repo(out / "triton", engine_dir=out / "engines", tokenizer_dir=tok_dir,
                                engine_config=ec)
    p = params(tr.validate_repo(repo)["preprocessing"])
    assert (p["end_id"], p["pad_id"], json.loads(p["stop_token_ids"])) == (str(end), str(end),
                                                                          [eot])
    info = json.loads((repo / "triton_repo.json").read_text())
    assert (info["end_id"], info["pad_id"], info["stop_token_ids"]) == (end, end, [eot])

    # the preprocessing model sends them to tensorrt_llm: end_id, and <|eot_id|> as a stop word
    # after the request's own stop words (TensorRT-LLM's [2, width] word-list format)
    pre = init_model(repo, "preprocessing")
    req = FakeRequest({"QUERY": np.array([[b"It is a truth"]], dtype=object),
                       "REQUEST_OUTPUT_LEN": np.array([[8]], dtype=np.int32),
                       "STOP_WORDS_DICT": np.array([[b"truth"]], dtype=object)})
    (resp,) = pre.execute([req])
    got = outputs_of(resp)
    assert got["OUT_END_ID"].tolist() == [[end]] and got["OUT_PAD_ID"].tolist() == [[end]]
    from transformers import AutoTokenizer

    truth = AutoTokenizer.from_pretrained(tok_dir).encode("truth", add_special_tokens=False)
    words = got["STOP_WORDS_IDS"][0]
    n = len(truth) + 1
    assert words[0, :n].tolist() == truth + [eot]
    assert words[1, :2].tolist() == [len(truth), n]
    # without request stop words the model's own still apply
    (resp,) = pre.execute([FakeRequest({"QUERY": np.array([[b"Hi"]], dtype=object),
                                        "REQUEST_OUTPUT_LEN": np.array([[8]], dtype=np.int32)})])
    assert outputs_of(resp)["STOP_WORDS_IDS"].tolist() == [[[eot], [1]]]


def test_instruct_style_eos_and_generation_pad(tmp_path, tokenizer_dir):
    """Llama-3-Instruct style: the tokenizer's eos is <|eot_id|> (end_id), generation_config
    lists both (the other one becomes a stop word); pad from generation_config."""
    tok_dir = tmp_path / "instruct_tok"
    ids = _llama3_like(tokenizer_dir, tok_dir, eos_token="<|eot_id|>",
                       generation_eos=["<|end_of_text|>", "<|eot_id|>"], pad_in_generation=True)
    got = special_token_ids(tok_dir)
    assert got["end_id"] == ids["<|eot_id|>"]
    assert got["stop_token_ids"] == [ids["<|end_of_text|>"]]
    assert got["pad_id"] == ids["<pad>"]


def test_llmapi_repo_records_the_tokens(tmp_path, tokenizer_dir):
    hf = tmp_path / "hf"
    ids = _llama3_like(tokenizer_dir, hf, eos_token="<|end_of_text|>",
                       generation_eos=["<|end_of_text|>", "<|eot_id|>"])
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                "model_type": "llama"}))
    repo = tr.write_llmapi_repo(tmp_path / "triton", model_dir=hf)
    info = json.loads((repo / "triton_repo.json").read_text())
    assert info["end_id"] == ids["<|end_of_text|>"]
    assert info["stop_token_ids"] == [ids["<|eot_id|>"]]


def test_unreadable_generation_config_is_one_line(tmp_path, tokenizer_dir):
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(UserError, match="generation_config.json: unreadable"):
        special_token_ids(d)
