"""Logits of our checkpoints, run by the CPU reference reader with TensorRT-LLM's semantics, match
the Hugging Face model: fp32 to 1e-5 relative, fp16 within fp16 rounding, argmax agreeing."""
from __future__ import annotations

import pytest
import torch

from convert_helper import convert_checkpoint
from verify.reference import ReferenceModel, compare_with_hf, verify

CASES = {
    "mha": dict(num_key_value_heads=8),
    "gqa": dict(num_key_value_heads=4),
    "kv_lt_tp": dict(num_key_value_heads=2),
    "vocab_pad": dict(vocab_size=1003),
    "tied": dict(tie_word_embeddings=True, vocab_size=999),
    "llama31_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16},
                         max_position_embeddings=256),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "attention_bias": dict(attention_bias=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tp,pp", [(1, 1), (4, 1), (2, 2)])
def test_llama_fp32_logits(tmp_path, tiny_model, case, tp, pp):
    hf_dir, model = tiny_model(num_hidden_layers=3, **CASES[case])
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, pp=pp, dtype="float32", progress=False)
    report, passed = verify(tmp_path / "ck", model)
    assert report["rel_err"] < 1e-5, report
    assert report["argmax_agreement"] == 1.0 and passed


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_fp32_and_fp16(tmp_path, tiny_model, family):
    hf_dir, model = tiny_model(family, num_key_value_heads=2, max_shard_size="200KB")
    convert_checkpoint(hf_dir, tmp_path / "f32", tp=2, dtype="float32", progress=False)
    assert verify(tmp_path / "f32", model)[0]["rel_err"] < 1e-5
    convert_checkpoint(hf_dir, tmp_path / "f16", tp=2, dtype="float16", progress=False)
    report, passed = verify(tmp_path / "f16", model)
    assert passed and report["rel_err"] < 4 * 2**-11, report  # a few fp16 rounding steps


def test_check_can_fail(tmp_path, tiny_model):
    """A checkpoint whose mlp.fc and mlp.gate are swapped (the naming trap) is caught."""
    from safetensors.torch import load_file, save_file

    hf_dir, model = tiny_model()
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=2, dtype="float32", progress=False)
    for r in range(2):
        f = ck / f"rank{r}.safetensors"
        sd = load_file(f)
        for i in range(2):
            a, b = f"transformer.layers.{i}.mlp.fc.weight", f"transformer.layers.{i}.mlp.gate.weight"
            sd[a], sd[b] = sd[b], sd[a]
        save_file(sd, f)
    report, passed = verify(ck, model)
    assert not passed and report["rel_err"] > 1e-2


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_real_text(tmp_path, smollm2_dir, shared_text, tp):
    """The real SmolLM2-135M at tp 1 and 3 (9 heads, 3 kv heads, tied embeddings, rope 1e5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    text = shared_text("austen.txt", 20000)[5000:6500]
    convert_checkpoint(smollm2_dir, tmp_path / "f32", tp=tp, dtype="float32", progress=False)
    r32 = compare_with_hf(tmp_path / "f32", hf, text=text, tokenizer=tok)
    assert r32["rel_err"] < 1e-5 and r32["argmax_agreement"] == 1.0, r32
    convert_checkpoint(smollm2_dir, tmp_path / "f16", tp=tp, dtype="float16", progress=False)
    ref = ReferenceModel(tmp_path / "f16")
    r16 = compare_with_hf(tmp_path / "f16", hf, text=text, tokenizer=tok, reference=ref)
    assert r16["rel_err"] < 1e-2 and r16["argmax_agreement"] > 0.97, r16
