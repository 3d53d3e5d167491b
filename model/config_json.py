"""A model's ``config.json`` normalised as transformers 5's ``AutoConfig`` does, without importing
transformers (whose import, with torch's distributed/dynamo modules it pulls in, costs 4-6 s of
a conversion that otherwise moves bytes at disk speed; see BENCHMARKS.md).

Only what ``model.config`` and ``convert.hf_config`` read is reproduced, for the supported
``model_type``s, from
``transformers/models/<type>/configuration_<type>.py`` (class defaults, ``head_dim`` and
``num_key_value_heads`` filled in ``__post_init__``, DeepSeek's MLA ``head_dim`` (= ``qk_rope_head_dim``)
and yarn, Mixtral's and Qwen3-MoE's expert-count
aliases, the MoE families' ``mlp_only_layers``) and
``modeling_rope_utils.py`` (``rope_scaling`` before ``rope_parameters``, ``rope_theta`` and the
class's default theta moved into the dict, ``type`` -> ``rope_type``, llama3's
``original_max_position_embeddings``). Anything else — another transformers major version, an
unknown ``model_type`` or rope type, a value of an unexpected type, a config transformers would
reject or normalise in ways not reproduced here — returns None, and the caller uses AutoConfig
(its result and its error messages). tests/test_hf_config.py compares both on every family and
rope variant.
"""
from __future__ import annotations

from types import SimpleNamespace

from common.versions import major_version

_COMMON = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False)
# class defaults of what hf_config reads (transformers 5.x configuration_<model_type>.py)
DEFAULTS = {
    "llama": dict(_COMMON, intermediate_size=11008, num_key_value_heads=None,
                  max_position_embeddings=2048, attention_bias=False, mlp_bias=False,
                  head_dim=None),
    "mistral": dict(_COMMON, intermediate_size=14336, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=4096 * 32),
    "qwen2": dict(_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768),
    "mixtral": dict(_COMMON, intermediate_size=14336, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, num_experts_per_tok=2,
                    num_local_experts=8),
    # head_dim is a plain default (128), not derived from hidden / heads
    "qwen3": dict(_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  head_dim=128, max_position_embeddings=32768, attention_bias=False,
                  use_sliding_window=False),
    # no head_dim: derived (hidden / heads) where absent; experts in every layer unless
    # mlp_only_layers / decoder_sparse_step say otherwise (model/families/qwen_moe.py refuses them)
    "qwen2_moe": dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=32768, use_sliding_window=False,
                      decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                      norm_topk_prob=False, mlp_only_layers=None, qkv_bias=True),
    "qwen3_moe": dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=32768, attention_bias=False,
                      use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                      mlp_only_layers=None),
    # MLA: head_dim is always qk_rope_head_dim (__post_init__, below); V3 routes noaux_tc
    # whatever the config says (transformers 5 keeps topk_method / scoring_func as plain keys)
    "deepseek_v2": dict(_COMMON, vocab_size=102400, intermediate_size=11008,
                        num_key_value_heads=None, max_position_embeddings=2048,
                        attention_bias=False, mlp_bias=False, first_k_dense_replace=0,
                        kv_lora_rank=512, q_lora_rank=1536, n_group=None, n_routed_experts=64,
                        n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        routed_scaling_factor=1.0, topk_group=None, topk_method="greedy",
                        norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
                        moe_intermediate_size=1407),
    "deepseek_v3": dict(_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
                        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True,
                        max_position_embeddings=4096, attention_bias=False),
}
#: model types whose __post_init__ sets head_dim = qk_rope_head_dim and qk_head_dim (MLA)
_MLA = ("deepseek_v2", "deepseek_v3")
DEFAULT_THETA = {"mixtral": 1e6}  # RotaryEmbeddingConfigMixin.default_theta otherwise: 10000
_ROPE_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                             "original_max_position_embeddings")}
_DTYPES = ("float16", "bfloat16", "float32", "float64")
_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
         "num_experts_per_tok", "num_local_experts", "num_experts", "moe_intermediate_size",
         "shared_expert_intermediate_size", "decoder_sparse_step", "kv_lora_rank", "q_lora_rank",
         "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
         "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
          "norm_topk_prob", "qkv_bias")
#: model_type -> (the config.json key, the attribute transformers 5 keeps it under): Mixtral's
#: and Qwen3-MoE's ``attribute_map`` (opposite directions)
_ALIASES = {"mixtral": ("num_experts", "num_local_experts"),
            "qwen3_moe": ("num_local_experts", "num_experts")}


def _transformers_major() -> int | None:
    return major_version("transformers")


def normalised_config(raw: dict):
    """``raw`` (a parsed config.json) as the attributes AutoConfig would give; None where this
    does not reproduce AutoConfig exactly (then use AutoConfig)."""
    model_type = raw.get("model_type")
    if model_type not in DEFAULTS or _transformers_major() != 5:
        return None
    fields = dict(raw)
    alias, attr = _ALIASES.get(model_type, (None, None))
    if alias in fields:  # the config class's attribute_map
        if attr in fields:
            return None
        fields[attr] = fields.pop(alias)
    for key, default in DEFAULTS[model_type].items():
        fields.setdefault(key, default)
    if "mlp_only_layers" in DEFAULTS[model_type]:  # __post_init__: None -> []
        layers = fields["mlp_only_layers"]
        if layers is None:
            fields["mlp_only_layers"] = []
        elif not (isinstance(layers, list) and all(type(x) is int for x in layers)):
            return None
    if not _types_ok(fields):
        return None
    heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
    if heads <= 0 or hidden % heads:
        return None  # transformers refuses it (validate_architecture): its message
    if model_type in _MLA:  # __post_init__
        fields["qk_head_dim"] = fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]
        fields["head_dim"] = fields["qk_rope_head_dim"]
    if "head_dim" in DEFAULTS[model_type] and fields["head_dim"] is None:
        fields["head_dim"] = hidden // heads
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = heads
    head_dim = fields.get("head_dim") or hidden // heads
    if head_dim > 4 and head_dim % 2:
        return None  # transformers refuses an odd rotary dimension
    if "dtype" in fields and "torch_dtype" in fields and fields["dtype"] != fields["torch_dtype"]:
        return None
    dtype = fields.get("dtype", fields.pop("torch_dtype", None))
    if dtype is not None and dtype not in _DTYPES:
        return None
    fields["dtype"] = dtype
    rope = _rope_parameters(fields, model_type)
    if rope is None:
        return None
    fields["rope_parameters"] = rope
    fields["rope_scaling"] = rope  # transformers 5 keeps the old name as an alias
    fields.pop("rope_theta", None)
    return SimpleNamespace(**fields)


def _types_ok(fields: dict) -> bool:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _INTS:
        v = fields.get(key)
        if v is not None and not is_int(v):
            return False
    if any(not isinstance(fields.get(k, False), bool) for k in _BOOLS):
        return False
    eps = fields["rms_norm_eps"]
    return (isinstance(eps, (int, float)) and not isinstance(eps, bool)
            and isinstance(fields["hidden_act"], str)
            and isinstance(fields.get("architectures"), list))


def _rope_parameters(fields: dict, model_type: str) -> dict | None:
    """modeling_rope_utils' convert_rope_params_to_dict + standardize_rope_params, for a flat
    (not per-layer-type) dict without partial rotary; None for anything else."""
    scaling, params = fields.get("rope_scaling"), fields.get("rope_parameters")
    rope = scaling or params or {}
    if not isinstance(rope, dict) or "partial_rotary_factor" in fields \
            or "original_max_position_embeddings" in fields:
        return None
    rope = dict(rope)
    if any(isinstance(v, dict) or v is None for v in rope.values()) \
            or "partial_rotary_factor" in rope:
        return None  # nested per layer type, or a NoPE entry
    theta = fields.get("rope_theta", DEFAULT_THETA.get(model_type, 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        return None
    rope.setdefault("rope_theta", theta)
    rope.setdefault("rope_type", rope.get("type", "default"))
    kind = rope["rope_type"]
    if kind not in _ROPE_REQUIRED or (kind == "yarn" and model_type not in _MLA):
        return None
    if kind in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", fields["max_position_embeddings"])
    if any(k not in rope for k in _ROPE_REQUIRED[kind]):
        return None  # transformers raises its KeyError naming the missing keys
    return rope
