"""DeepSeek-V2 and DeepSeek-V2-Lite (``DeepseekV2ForCausalLM``): multi-head latent attention
(MLA) and fine-grained mixture of experts with shared experts.

What TensorRT-LLM 1.2's engine flow does (``tensorrt_llm/models/deepseek_v2/``), restated:

- ``convert.py`` ``load_weights_from_hf_model`` / ``convert_layer``: ``attention.fused_a`` =
  ``q_a_proj`` ++ ``kv_a_proj_with_mqa`` (V2-Lite, no q-LoRA: ``kv_a_proj_with_mqa`` alone),
  whole on every rank (``DeepseekV2Attention`` builds it as a ColumnLinear without tp);
  ``attention.q_b_proj`` (V2-Lite: ``q_proj``) and ``attention.kv_b_proj`` split by heads, the
  latter re-ordered to [every head's k_nope rows; every head's v rows]; the absorbed
  ``attention.fused_q_proj`` (convert.compute); ``attention.q_a_layernorm`` /
  ``attention.kv_a_layernorm``; ``attention.dense`` = ``o_proj`` row-parallel. The three MLA
  projections are plain Parameters (no ``.weight``, never quantized); ``dense``, the MLPs and
  the experts are linears, quantized by trtllm-build for weight-only formats. ``fused_a`` is
  written in float by the converter (``get_tllm_linear_weight`` without ``use_weight_only``) and
  ``weight_only_quantize_dict`` (models/convert_utils.py) quantizes only names with ``qkv``,
  ``dense``, ``fc``, ``proj`` or ``gate``: it is listed in ``exclude_modules``
  (``Family.unquantized``), so that the engine builds it as a float linear.
- MoE layers: ``mlp.fc`` = the rank's experts' [up; gate] rows stacked, ``mlp.proj`` = down,
  the router ``mlp.router.weight`` float32 whole, the shared experts ``mlp.shared_expert.fc`` =
  [up rows; gate rows] of the rank and ``mlp.shared_expert.proj`` = down, split by tp. Dense
  layers (``model.py`` ``DeepseekV2DecoderLayer``: layer 0 only, ``layer_idx > 0`` has the
  MoE): ``mlp.fc`` = gate_proj, ``mlp.gate`` = up_proj, ``mlp.proj`` = down_proj.
- The rotary part of q and k (``q_pe``, ``k_pe``) is written as HF holds it: TensorRT-LLM's MLA
  kernels (``cpp/tensorrt_llm/kernels/mlaKernels.cu``, ``applyMLARopeAndAssignQKVKernel*``)
  rotate adjacent pairs (``apply_rotary_embedding_gptj``), as HF DeepSeek-V2 does
  (``view_as_complex`` over pairs), so no row permutation.
- ``config.py`` ``DeepSeekV2Config.from_hugging_face``: see :func:`trtllm_fields`.
"""
from __future__ import annotations

from common.errors import UserError
from model.spec import (COLUMN, EXPERT_COLUMN, EXPERT_ROW, HF_LAYER, REPLICATED, ROW, TRT_LAYER,
                        Family, Linear, MlaDims, Rule, norm)

from .llama import EMBED, HEAD, NORMS

_A = "self_attn."
_E = "mlp.experts.{e}."

ATTENTION = (
    Linear("attention.fused_a", (_A + "q_a_proj", _A + "kv_a_proj_with_mqa"), REPLICATED,
           (("q_lora", "hidden"), ("kv_a", "hidden")), norm="input_layernorm", when="q_lora"),
    Linear("attention.fused_a", (_A + "kv_a_proj_with_mqa",), REPLICATED, (("kv_a", "hidden"),),
           norm="input_layernorm", when="no_q_lora"),
    Linear("attention.dense", (_A + "o_proj",), ROW, (("hidden", "mla_o"),)),
)

DENSE_MLP = (
    Linear("mlp.fc", ("mlp.gate_proj",), COLUMN, (("inter", "hidden"),), group="gate_up",
           norm="post_attention_layernorm", when="dense_layer"),
    Linear("mlp.gate", ("mlp.up_proj",), COLUMN, (("inter", "hidden"),), group="gate_up",
           norm="post_attention_layernorm", when="dense_layer"),
    Linear("mlp.proj", ("mlp.down_proj",), ROW, (("hidden", "inter"),), when="dense_layer"),
)

MOE = (
    Linear("mlp.fc", (_E + "up_proj", _E + "gate_proj"), EXPERT_COLUMN,
           (("moe_inter", "hidden"),) * 2, group="experts", norm="post_attention_layernorm",
           experts=True, when="moe_layer"),
    Linear("mlp.proj", (_E + "down_proj",), EXPERT_ROW, (("hidden", "moe_inter"),),
           group="experts", experts=True, when="moe_layer"),
    Linear("mlp.shared_expert.fc", ("mlp.shared_experts.up_proj", "mlp.shared_experts.gate_proj"),
           COLUMN, (("shared_inter", "hidden"),) * 2, norm="post_attention_layernorm",
           when="moe_layer"),
    Linear("mlp.shared_expert.proj", ("mlp.shared_experts.down_proj",), ROW,
           (("hidden", "shared_inter"),), when="moe_layer"),
)


def _mla(trt: str, hf: tuple[str, ...], shard: str, shapes, when=None) -> Rule:
    return Rule(TRT_LAYER + trt, tuple(HF_LAYER + _A + h + ".weight" for h in hf), shard,
                when=when, shapes=shapes)


MLA = (
    norm("attention.kv_a_layernorm", _A + "kv_a_layernorm", dim="kv_lora"),
    Rule(TRT_LAYER + "attention.q_a_layernorm.weight", (HF_LAYER + _A + "q_a_layernorm.weight",),
         REPLICATED, when="q_lora", shapes=(("q_lora",),)),
    _mla("attention.q_b_proj", ("q_b_proj",), COLUMN, (("mla_q", "q_lora"),), "q_lora"),
    _mla("attention.q_b_proj", ("q_proj",), COLUMN, (("mla_q", "hidden"),), "no_q_lora"),
    _mla("attention.kv_b_proj", ("kv_b_proj",), "mla_kv_b", (("mla_kv", "kv_lora"),)),
    _mla("attention.fused_q_proj", ("q_b_proj", "kv_b_proj"), "mla_absorb",
         (("mla_q", "q_lora"), ("mla_kv", "kv_lora")), "q_lora"),
    _mla("attention.fused_q_proj", ("q_proj", "kv_b_proj"), "mla_absorb",
         (("mla_q", "hidden"), ("mla_kv", "kv_lora")), "no_q_lora"),
)

ROUTER = Rule(TRT_LAYER + "mlp.router.weight", (HF_LAYER + "mlp.gate.weight",), REPLICATED,
              dtype="float32", when="moe_layer", shapes=(("experts", "hidden"),))

#: TensorRT-LLM's MoeConfig.ExpertScaleNormalizationMode
NONE, RENORMALIZE, DEVICE_LIMITED, DEVICE_LIMITED_RENORM = 0, 1, 3, 4


def shape_fields(hf) -> dict:
    """The Shape of a DeepSeek-V2 config: one KV head of ``kv_lora_rank + qk_rope_head_dim``
    (the latent cache TensorRT-LLM's MLA attention holds), the routed experts' and the shared
    experts' sizes, and the dense layers before ``first_k_dense_replace``. Refused: what
    TensorRT-LLM 1.2's DeepseekV2ForCausalLM cannot build."""
    first = int(getattr(hf, "first_k_dense_replace", 0) or 0)
    freq = int(getattr(hf, "moe_layer_freq", 1) or 1)
    if first != 1 or freq != 1:
        raise UserError(f"DeepseekV2ForCausalLM with first_k_dense_replace {first} and "
                        f"moe_layer_freq {freq} is not supported: TensorRT-LLM 1.2's "
                        "DeepseekV2DecoderLayer builds a dense MLP in layer 0 and MoE in every "
                        "other layer (first_k_dense_replace 1, moe_layer_freq 1)")
    if getattr(hf, "scoring_func", "softmax") not in (None, "softmax"):
        raise UserError("DeepseekV2ForCausalLM with scoring_func other than softmax is not "
                        "supported: TensorRT-LLM 1.2's MoE routes DeepSeek-V2 by softmax")
    m = MlaDims(int(hf.q_lora_rank or 0), hf.kv_lora_rank, hf.qk_nope_head_dim,
                hf.qk_rope_head_dim, hf.v_head_dim)
    return dict(kv_heads=1, head_size=m.kv_lora + m.rope, mla=m, experts=hf.n_routed_experts,
                top_k=hf.num_experts_per_tok, moe_normalization=_routing(hf)[0],
                moe_inter=hf.moe_intermediate_size, first_dense=first,
                shared_inter=(hf.n_shared_experts or 0) * hf.moe_intermediate_size,
                attn_bias=False, dense_bias=False)


def _routing(hf) -> tuple[int, int, int, float]:
    """(normalization_mode, n_group, topk_group, routed_scaling_factor) as DeepSeekV2Config
    .from_hugging_face maps ``topk_method`` (noaux_tc: DeepSeek-V3, refused by the family)."""
    method, k = getattr(hf, "topk_method", "greedy"), hf.num_experts_per_tok
    scale = float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0)
    renorm = k > 1 and bool(getattr(hf, "norm_topk_prob", False))
    if method == "group_limited_greedy":
        mode = DEVICE_LIMITED_RENORM if renorm else DEVICE_LIMITED
    elif method == "greedy":
        if scale != 1.0:
            raise UserError(f"topk_method greedy with routed_scaling_factor {scale} is not "
                            "supported by TensorRT-LLM 1.2's DeepSeek-V2 (DeepSeekV2Config)")
        mode = RENORMALIZE if renorm else NONE
    else:
        raise UserError(f"DeepseekV2ForCausalLM with topk_method {method!r} is not supported by "
                        "TensorRT-LLM 1.2's engine flow (greedy, group_limited_greedy)")
    return mode, int(hf.n_group or 0), int(hf.topk_group or 0), scale


def rotary(hf) -> tuple[float, dict]:
    """(rotary_base, rotary_scaling): DeepSeekV2Config writes HF's yarn parameters as
    ``type: yarn``, and DeepseekV2Attention reads them unconditionally; a config without yarn
    is written as the identity yarn (factor 1: the inverse frequencies and the cos/sin scale of
    plain RoPE, ``RopeEmbeddingUtils.create_sinusoidal_positions_yarn``), which TensorRT-LLM's
    own converter cannot (it writes None and the model fails to build)."""
    p = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(p.get("rope_theta", getattr(hf, "rope_theta", 10000.0) or 10000.0))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind in (None, "default"):
        p = dict(factor=1.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.0,
                 original_max_position_embeddings=hf.max_position_embeddings)
    elif kind != "yarn":
        raise UserError(f"DeepseekV2ForCausalLM with rope type {kind!r} is not supported: "
                        "TensorRT-LLM 1.2's MLA attention takes yarn (or no scaling)")
    keys = ("beta_fast", "beta_slow", "factor", "mscale", "mscale_all_dim",
            "original_max_position_embeddings")
    return theta, dict({k: p.get(k, _YARN_DEFAULTS.get(k)) for k in keys}, type="yarn")


#: HF DeepSeek's yarn defaults (modeling_rope_utils: beta_fast 32, beta_slow 1, mscale 1)
_YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0}


def trtllm_fields(hf, shape, tp: int) -> dict:
    """DeepSeekV2Config.from_hugging_face + to_dict: the MLA sizes, the MoE block with the shared
    experts and the device-limited routing, and the fields transformers 5's DeepseekV2Config
    lacks (``moe_layer_freq`` 1, ``scoring_func`` softmax: TensorRT-LLM reads them, spelling
    the latter ``coring_func``)."""
    return mla_fields(hf, shape, _routing(hf), getattr(hf, "topk_method", "greedy"),
                      getattr(hf, "scoring_func", None) or "softmax")


def mla_fields(hf, shape, routing: tuple, topk_method: str, scoring: str) -> dict:
    """:func:`trtllm_fields` with the routing given ((mode, n_group, topk_group, scale),
    ``topk_method``, ``scoring_func``): DeepSeek-V3's for the reader."""
    m = shape.mla
    mode, n_group, topk_group, scale = routing
    return {
        "hidden_act": "swiglu", "mlp_bias": False, "attn_bias": False, "residual_mlp": False,
        "disable_weight_only_quant_plugin": False, "fc_after_embed": False,
        "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True,
        "layer_idx_offset": 0, "moe_inter_size": shape.expert_inter,
        "moe": {"num_experts": shape.experts, "shared_expert_intermediate_size": shape.shared_inter,
                "top_k": shape.top_k, "normalization_mode": mode,
                "device_limited_n_group": n_group, "device_limited_topk_group": topk_group,
                "device_limited_routed_scaling_factor": scale},
        "kv_lora_rank": m.kv_lora, "q_lora_rank": m.q_lora or None,
        "qk_nope_head_dim": m.nope, "qk_rope_head_dim": m.rope, "v_head_dim": m.v,
        "topk_method": topk_method,
        "first_k_dense_replace": shape.first_dense,
        "moe_layer_freq": int(getattr(hf, "moe_layer_freq", 1) or 1),
        "coring_func": scoring,
        "fp8_format": False,
    }


#: proven here (tests/test_deepseek_v2.py): float and the weight-only formats TensorRT-LLM's
#: DeepSeek-V2 converter offers, for the engine; nothing for --target pytorch yet
FORMATS = {"engine": ((None, None), ("W8A16", None), ("W4A16", None)), "pytorch": ()}

DEEPSEEK_V2 = Family(
    "deepseek_v2", ("DeepseekV2ForCausalLM",), EMBED, ATTENTION + DENSE_MLP + MOE, NORMS, HEAD,
    extra=MLA + (ROUTER,), trtllm_config=trtllm_fields, formats=FORMATS,
    hidden_padding="TensorRT-LLM's MLA projections and MoE experts are not padded",
    shape_fields=shape_fields, rotary=rotary, layerwise=False, unquantized=("*fused_a",))
