"""DeepSeek-V3 / R1 (``DeepseekV3ForCausalLM``): written for TensorRT-LLM's PyTorch backend only.

TensorRT-LLM has no TensorRT engine class for DeepSeek-V3 (``tensorrt_llm/models/__init__.py``
``MODEL_MAP`` has ``DeepseekV2ForCausalLM`` only; NVIDIA/TensorRT-LLM #2831, #2845): the model
runs on the PyTorch backend (``tensorrt_llm/_torch/models/modeling_deepseekv3.py``) from a Hugging
Face / modelopt unified checkpoint, i.e. ``--target pytorch``. ``--target engine`` is refused in
one line saying so (:data:`TARGET_REFUSALS`).

What differs from DeepSeek-V2 (model/families/deepseek_v2.py, whose tensor rules it shares: the
HF module names are the same):

* routing ``noaux_tc``: sigmoid scores, a per-expert ``mlp.gate.e_score_correction_bias`` added
  for the choice only (groups of ``n_routed_experts / n_group`` ranked by their top-2 sum,
  ``topk_group`` kept), the chosen sigmoid scores renormalised (``norm_topk_prob``) and scaled by
  ``routed_scaling_factor`` (transformers 5 ``DeepseekV3TopkRouter`` / ``DeepseekV3MoE``, which
  ignore ``topk_method`` / ``scoring_func``; TensorRT-LLM ``Deepseekv3RoutingImpl``);
* any ``first_k_dense_replace`` (V3 and R1: 3 dense layers);
* the released weights are FP8 block-scaled (``weight_scale_inv`` per 128 x 128 block): read and
  dequantized tensor by tensor as a source format (convert/block_fp8.py).
"""
from __future__ import annotations

from model.spec import HF_LAYER, REPLICATED, TRT_LAYER, Family, MlaDims, Rule

from .deepseek_v2 import (ATTENTION, DENSE_MLP, DEVICE_LIMITED, DEVICE_LIMITED_RENORM, MLA, MOE,
                          ROUTER, mla_fields, rotary)
from .llama import EMBED, HEAD, NORMS

#: the noaux_tc router's correction bias (float32 in the released checkpoints)
SCORE_BIAS = Rule(TRT_LAYER + "mlp.router.e_score_correction_bias",
                  (HF_LAYER + "mlp.gate.e_score_correction_bias",), REPLICATED, dtype="float32",
                  when="moe_layer", shapes=(("experts",),))


def shape_fields(hf) -> dict:
    """The Shape of a DeepSeek-V3 config: V2's MLA sizes (one latent KV head of
    ``kv_lora_rank + qk_rope_head_dim``), the routed and shared experts, the dense layers below
    ``first_k_dense_replace``."""
    m = MlaDims(int(hf.q_lora_rank or 0), hf.kv_lora_rank, hf.qk_nope_head_dim,
                hf.qk_rope_head_dim, hf.v_head_dim)
    return dict(kv_heads=1, head_size=m.kv_lora + m.rope, mla=m, experts=hf.n_routed_experts,
                top_k=hf.num_experts_per_tok, moe_inter=hf.moe_intermediate_size,
                first_dense=int(getattr(hf, "first_k_dense_replace", 0) or 0),
                shared_inter=(hf.n_shared_experts or 0) * hf.moe_intermediate_size,
                attn_bias=False, dense_bias=False)


def reader_fields(hf, shape, tp: int) -> dict:
    """The TensorRT-LLM-form config keys the CPU reader runs the checkpoint with (DeepSeek-V2's,
    verify/mla.py; no engine is built from them): routing ``noaux_tc`` with sigmoid scores,
    normalisation DEVICE_LIMITED_RENORM (``norm_topk_prob``) or DEVICE_LIMITED, the groups and
    the scaling factor (verify/reference_moe.py)."""
    renorm = shape.top_k > 1 and bool(getattr(hf, "norm_topk_prob", True))
    routing = (DEVICE_LIMITED_RENORM if renorm else DEVICE_LIMITED, int(hf.n_group or 0),
               int(hf.topk_group or 0), float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0))
    return mla_fields(hf, shape, routing, "noaux_tc", "sigmoid")


#: proven here (tests/test_deepseek_v3.py): the float unified checkpoint (bf16 / the source's
#: dtype, a block-scaled FP8 source dequantized) for --target pytorch; no engine
FORMATS = {"engine": (), "pytorch": ((None, None),)}

#: target -> why the family cannot be written there at all (asked before any work)
TARGET_REFUSALS = {
    "engine": ("DeepseekV3ForCausalLM (DeepSeek-V3 / R1) has no TensorRT engine in TensorRT-LLM "
               "1.2 (no engine model class; NVIDIA/TensorRT-LLM #2831, #2845): it runs on the "
               "PyTorch backend from a unified checkpoint; use --target pytorch"),
}

DEEPSEEK_V3 = Family(
    "deepseek_v3", ("DeepseekV3ForCausalLM",), EMBED, ATTENTION + DENSE_MLP + MOE, NORMS, HEAD,
    extra=MLA + (ROUTER, SCORE_BIAS), formats=FORMATS, target_refusals=TARGET_REFUSALS,
    hidden_padding="TensorRT-LLM's MLA projections and MoE experts are not padded",
    shape_fields=shape_fields, rotary=rotary, trtllm_config=reader_fields, layerwise=False,
    unquantized=("*fused_a",))
