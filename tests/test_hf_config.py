"""from_hugging_face: config fields per family, rope variants, and the parallel-layout preflight."""
from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from convert.errors import UserError
from convert.hf_config import (from_hugging_face, model_shape, pp_layer_range, preflight,
                               read_hf_config, valid_tp_values)


def _llama(**kw):
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=1000, architectures=["LlamaForCausalLM"])
    base.update(kw)
    return LlamaConfig(**base)


def test_llama_fields():
    c = from_hugging_face(_llama(rope_theta=500000.0, rms_norm_eps=1e-5), dtype="bfloat16", tp=2, pp=2)
    assert c["architecture"] == "LlamaForCausalLM"
    assert c["dtype"] == "bfloat16"
    assert c["head_size"] == 8 and c["num_key_value_heads"] == 4
    assert c["rotary_base"] == 500000.0 and c["rotary_scaling"] is None
    assert c["norm_epsilon"] == 1e-5
    assert c["position_embedding_type"] == "rope_gpt_neox"
    assert c["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert c["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert c["attn_bias"] is False and c["tie_word_embeddings"] is False


def test_llama31_rope_scaling_from_transformers5_rope_parameters():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf = _llama(rope_scaling=rope, max_position_embeddings=131072)
    c = from_hugging_face(hf)
    assert c["rotary_base"] == 500000.0
    assert c["rotary_scaling"]["type"] == "llama3" and c["rotary_scaling"]["factor"] == 8.0
    assert c["rotary_scaling"]["original_max_position_embeddings"] == 8192
    assert "rope_theta" not in c["rotary_scaling"]


def test_linear_rope_scaling():
    c = from_hugging_face(_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert c["rotary_scaling"]["type"] == "linear" and c["rotary_scaling"]["factor"] == 2.0


def test_qwen2_has_qkv_bias_but_no_dense_bias():
    hf = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                     architectures=["Qwen2ForCausalLM"], rope_theta=1e6)
    c = from_hugging_face(hf)
    assert c["architecture"] == "Qwen2ForCausalLM" and c["qwen_type"] == "qwen2"
    assert c["attn_bias"] is True and c["rotary_base"] == 1e6
    s = model_shape(hf)
    assert s.attn_bias and not s.dense_bias


def test_dtype_auto_follows_model():
    assert from_hugging_face(_llama(dtype="bfloat16"))["dtype"] == "bfloat16"
    assert from_hugging_face(_llama(dtype="float32"))["dtype"] == "float16"  # as TRT-LLM infers
    assert from_hugging_face(_llama(dtype="float32"), dtype="float32")["dtype"] == "float32"


def test_preflight_names_numbers_and_valid_values():
    s = model_shape(_llama(num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                           intermediate_size=1536))
    with pytest.raises(UserError) as e:
        preflight(s, 2, 1)
    msg = str(e.value)
    assert "9 attention heads" in msg and "tp 2" in msg and msg.endswith(  # 1536 % 9 != 0
        "valid --tp values: 1, 3; or add --pad-heads to pad 9 -> 12 heads, 3 -> 4 KV heads (exact; "
        "+33 % attention compute and KV cache)")
    assert "\n" not in msg
    assert valid_tp_values(s) == [1, 3]
    assert preflight(s, 3, 1, pad_heads=True).padding is None  # tp divides the heads: not padded
    padded = preflight(s, 2, 1, pad_heads=True)
    assert (padded.tp_heads, padded.tp_kv_heads, padded.heads) == (12, 4, 9)
    cfg = from_hugging_face(_llama(num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                   intermediate_size=1536), tp=2, pad_heads=True)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == (12, 4, 64)


def test_preflight_kv_and_pp():
    s = model_shape(_llama(num_attention_heads=12, num_key_value_heads=3, hidden_size=96,
                           intermediate_size=96))
    with pytest.raises(UserError, match="3 key/value heads cannot be split over tp 2"):
        preflight(s, 2, 1)
    preflight(s, 6, 1)  # 3 kv heads duplicated over 6 ranks
    with pytest.raises(UserError, match="--pp 5 is larger than the model's 4 layers"):
        preflight(s, 1, 5)


def test_pp_ranges_give_first_stages_the_extra_layers():
    assert [list(pp_layer_range(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(pp_layer_range(7, 3, r)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(UserError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        read_hf_config(tmp_path)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_hf_config(tmp_path / "nope")
    with pytest.raises(UserError, match="has no config.json"):
        read_hf_config(tmp_path)


def test_real_config_roundtrip(tmp_path):
    _llama().save_pretrained(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert from_hugging_face(hf)["vocab_size"] == 1000
