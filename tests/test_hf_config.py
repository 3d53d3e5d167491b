"""from_hugging_face: config fields per family, rope variants, and the parallel-layout preflight."""
from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from common.errors import UserError
from convert.hf_config import from_hugging_face, pp_layer_range
from model.config import read_hf_config
from model.shape import model_shape, preflight, valid_tp_values


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


def test_qwen3_fields_are_trtllm_qwen_converters():
    """QWenConfig.from_hugging_face for qwen3: qwen_type, seq_length, no attention bias, head_dim
    from HF (not hidden / heads)."""
    from transformers import Qwen3Config

    hf = Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000,
                     architectures=["Qwen3ForCausalLM"], tie_word_embeddings=True)
    c = from_hugging_face(hf, tp=2)
    assert (c["qwen_type"], c["seq_length"], c["head_size"]) == ("qwen3", 8192, 32)
    assert c["attn_bias"] is False and c["tie_word_embeddings"] is True
    assert list(c)[-2:] == ["qwen_type", "seq_length"]  # after the common keys, as for Qwen2


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


# --- config.json read without transformers (model/config_json.py) vs AutoConfig -------------

_L31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
# real configs' fields (Llama-3.1-8B, Mistral-7B-v0.1, Qwen2-7B, Mixtral-8x7B), shrunk where it
# does not matter, plus each family's minimal config (class defaults) and every rope variant
_CONFIGS = {
    "llama31": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "rope_scaling": _L31_ROPE, "torch_dtype": "bfloat16",
                "max_position_embeddings": 131072, "tie_word_embeddings": False,
                "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"},
    "llama31_t5_rope_parameters": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                   "rope_parameters": dict(_L31_ROPE, rope_theta=500000.0),
                                   "dtype": "bfloat16", "max_position_embeddings": 131072},
    "llama3_no_original_max": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                               "rope_scaling": {k: v for k, v in _L31_ROPE.items()
                                                if k != "original_max_position_embeddings"},
                               "max_position_embeddings": 131072},
    "llama_linear_old_type_key": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "rope_scaling": {"type": "linear", "factor": 2.0},
                                  "torch_dtype": "float16"},
    "llama_dynamic": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                      "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "rope_theta": 1e6},
    "llama_default_rope_type": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                "rope_scaling": {"rope_type": "default"}, "torch_dtype": "float32"},
    "llama_rope_scaling_null": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                "rope_scaling": None, "head_dim": 64, "num_key_value_heads": None,
                                "attention_bias": True, "mlp_bias": True,
                                "tie_word_embeddings": True},
    "llama_minimal": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "smollm2_like": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
                     "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-05},
    "mistral7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                  "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000,
                  "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "bfloat16",
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-5},
    "mistral_minimal": {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
    "mistral_arch_llama_type": {"architectures": ["MistralForCausalLM"], "model_type": "llama"},
    "qwen2_7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                 "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "num_hidden_layers": 28, "vocab_size": 152064, "rope_theta": 1000000.0,
                 "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
                 "torch_dtype": "bfloat16", "max_position_embeddings": 131072,
                 "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "seq_length": 32768},
    "qwen2_minimal_head_dim": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                               "head_dim": 256, "rope_scaling": {"type": "linear", "factor": 4}},
    "qwen3_0_6b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                   "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28,
                   "vocab_size": 151936, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "max_position_embeddings": 40960,
                   "max_window_layers": 28, "use_sliding_window": False, "sliding_window": None,
                   "attention_bias": False, "torch_dtype": "bfloat16"},
    "qwen3_minimal": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                      "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mixtral8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000,
                    "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
                    "torch_dtype": "bfloat16", "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.02},
    "qwen2_moe_a2_7b": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                        "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "num_hidden_layers": 24, "vocab_size": 151936,
                        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                        "shared_expert_intermediate_size": 5632, "norm_topk_prob": False,
                        "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True,
                        "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
                        "max_position_embeddings": 8192, "use_sliding_window": False,
                        "sliding_window": 32768, "max_window_layers": 21},
    "qwen2_moe_minimal": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"},
    "qwen3_moe_30b_a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                          "hidden_size": 2048, "intermediate_size": 6144, "head_dim": 128,
                          "num_attention_heads": 32, "num_key_value_heads": 4,
                          "num_hidden_layers": 48, "vocab_size": 151936, "num_experts": 128,
                          "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                          "norm_topk_prob": True, "decoder_sparse_step": 1,
                          "mlp_only_layers": [], "rope_theta": 1000000.0,
                          "torch_dtype": "bfloat16", "max_position_embeddings": 40960,
                          "attention_bias": False, "use_sliding_window": False,
                          "sliding_window": None, "max_window_layers": 48},
    "qwen3_moe_minimal_local_experts": {"architectures": ["Qwen3MoeForCausalLM"],
                                        "model_type": "qwen3_moe", "num_local_experts": 8,
                                        "num_experts_per_tok": 2, "mlp_only_layers": None},
    # DeepSeek-V2-Lite's released config.json (yarn as rope_scaling "type", q-LoRA off)
    "deepseek_v2_lite": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                         "hidden_size": 2048, "intermediate_size": 10944,
                         "moe_intermediate_size": 1408, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "num_hidden_layers": 27, "vocab_size": 102400,
                         "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                         "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6,
                         "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1,
                         "topk_group": 1, "topk_method": "greedy", "norm_topk_prob": False,
                         "routed_scaling_factor": 1.0, "scoring_func": "softmax",
                         "max_position_embeddings": 163840, "rope_theta": 10000,
                         "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
                                          "mscale": 0.707, "mscale_all_dim": 0.707,
                                          "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
                         "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6,
                         "tie_word_embeddings": False, "attention_bias": False},
    "deepseek_v2_minimal": {"architectures": ["DeepseekV2ForCausalLM"],
                            "model_type": "deepseek_v2", "num_experts_per_tok": 6,
                            "moe_intermediate_size": 1408,
                            "first_k_dense_replace": 1},
    "mixtral_minimal_num_experts": {"architectures": ["MixtralForCausalLM"],
                                    "model_type": "mixtral", "num_experts": 4,
                                    "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
}


def _both(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    fast = read_hf_config(tmp_path)
    auto = read_hf_config(tmp_path, auto_config=True)
    return fast, auto


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_config_json_without_transformers_equals_autoconfig(tmp_path, name):
    """What the converter takes from the config (shape, dtype, rope, every field of the TRT-LLM
    config.json at several layouts) is the same read without transformers as with AutoConfig."""
    from transformers import PreTrainedConfig

    fast, auto = _both(tmp_path, _CONFIGS[name])
    assert not isinstance(fast, PreTrainedConfig), "expected the transformers-free reader"
    assert isinstance(auto, PreTrainedConfig)
    assert model_shape(fast) == model_shape(auto)
    for dtype in ("auto", "float16"):
        for tp, pp in ((1, 1), (valid_tp_values(model_shape(auto), 8)[1], 2)):
            assert from_hugging_face(fast, dtype=dtype, tp=tp, pp=pp) == \
                from_hugging_face(auto, dtype=dtype, tp=tp, pp=pp)


@pytest.mark.parametrize("raw", [
    {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    {"model_type": "llama", "partial_rotary_factor": 0.5},
    {"model_type": "llama", "vocab_size": 1000.0},
    {"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3},
    {"model_type": "llama", "torch_dtype": "auto"},
    {"model_type": "llama", "original_max_position_embeddings": 4096,
     "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0}, "max_position_embeddings": 131072},
    {"model_type": "llama", "rope_scaling": {"full_attention": {"rope_type": "default"}}},
    {"model_type": "gemma"},
    {},
], ids=["yarn", "llama3_missing_keys", "partial_rotary", "float_vocab", "bad_heads",
        "dtype_auto", "top_level_original_max", "nested_rope", "other_model_type", "no_model_type"])
def test_config_json_falls_back_to_autoconfig(tmp_path, raw):
    """What the reader does not reproduce exactly goes to AutoConfig: its result, or its error
    as the one-line UserError (exactly as before)."""
    from transformers import PreTrainedConfig

    raw = dict(raw, architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    try:
        got = read_hf_config(tmp_path)
    except UserError as e:
        with pytest.raises(UserError) as auto:
            read_hf_config(tmp_path, auto_config=True)
        assert str(e) == str(auto.value) and "with transformers" in str(e)
    else:
        assert isinstance(got, PreTrainedConfig)


def test_conversion_does_not_import_transformers(tmp_path, tiny_model):
    """A float conversion reads config.json without importing transformers (4-6 s here)."""
    import subprocess
    import sys

    hf_dir, _ = tiny_model()
    code = ("import sys; from convert.convert import convert_checkpoint; "
            f"convert_checkpoint({str(hf_dir)!r}, {str(tmp_path / 'out')!r}, tp=2, progress=False); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert (tmp_path / "out" / "rank1.safetensors").is_file()


#: DeepSeek-V3's released config.json (its auto_map dropped: a local directory without the remote
#: code) and R1's differences; a minimal one on the class defaults
_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
       "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
       "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 61,
       "vocab_size": 129280, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
       "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
       "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8,
       "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
       "norm_topk_prob": True, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
       "max_position_embeddings": 163840, "rope_theta": 10000,
       "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                        "type": "yarn"},
       "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
       "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                               "quant_method": "fp8", "weight_block_size": [128, 128]}}


@pytest.mark.parametrize("raw", [_V3, {"architectures": ["DeepseekV3ForCausalLM"],
                                       "model_type": "deepseek_v3"}], ids=["v3", "v3_minimal"])
def test_deepseek_v3_config_without_transformers_equals_autoconfig(tmp_path, raw):
    """DeepSeek-V3 (no engine config: --target pytorch) takes the fast path too: the shape and
    every attribute the family reads equal AutoConfig's."""
    from transformers import PreTrainedConfig

    fast, auto = _both(tmp_path, raw)
    assert not isinstance(fast, PreTrainedConfig) and isinstance(auto, PreTrainedConfig)
    assert model_shape(fast) == model_shape(auto)
    for key in ("head_dim", "qk_head_dim", "rope_parameters", "q_lora_rank", "n_group",
                "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace",
                "max_position_embeddings", "rms_norm_eps", "n_shared_experts"):
        assert getattr(fast, key) == getattr(auto, key), key

