"""Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen2's / Qwen3's
attention, and in every decoder layer a mixture of experts laid out as Mixtral's.

TensorRT-LLM 1.2 (read in its sources, cited in docs/trtllm-format.md, "Qwen2-MoE / Qwen3-MoE"):

- ``tensorrt_llm/models/qwen/config.py``, ``QWenConfig.from_hugging_face``: ``qwen_type`` the HF
  ``model_type``; ``hidden_act`` "swiglu"; ``moe`` from HF ``num_experts`` /
  ``num_experts_per_tok`` with ``normalization_mode`` NONE; ``moe_intermediate_size`` and
  ``moe_shared_expert_intermediate_size`` (0 when HF has none) beside ``intermediate_size``;
  ``attn_bias`` true for qwen2_moe, false for qwen3_moe.
- ``tensorrt_llm/models/qwen/model.py``, ``QWenDecoderLayer.__init__``: every layer's MLP is
  ``MOE`` (``config.moe.has_moe()``) of width ``moe_intermediate_size``; qwen2_moe's is a
  ``SharedMoE`` (``tensorrt_llm/layers/moe.py``) with ``use_shared_gate``: a tp-split ``MLP``
  ``mlp.shared_expert`` (fc ``[up; gate]`` per rank as for an expert, swiglu; proj row-parallel)
  scaled by ``sigmoid(mlp.shared_expert_gate(x))``, a ``RowLinear(hidden, 1)`` with tp 1;
  qwen3_moe's attention has the per-head q/k norms (``qk_layernorm``), as Qwen3.
- ``tensorrt_llm/models/qwen/convert.py``, ``convert_hf_qwen``: experts stacked over the rank's
  expert-parallel block, ``mlp.fc`` = [up; gate] split by moe_tp, ``mlp.proj`` = down; the router
  ``mlp.router`` float32; ``mlp.shared_expert.fc`` = [up; gate] and ``.proj`` split by tp;
  ``mlp.shared_expert_gate`` [1, hidden] in the model dtype, never quantized.

Routing: HF normalises the top-k probabilities when ``norm_topk_prob`` (Qwen3-MoE's released
models), which ``from_hugging_face`` does not carry over (it always writes NONE). TensorRT-LLM's
``MixtureOfExperts.renormalize`` (``normalization_mode`` RENORMALIZE) takes the top-k router
logits and a softmax over those k: the top-k probabilities divided by their sum, HF's
``norm_topk_prob``. The config.json ``moe`` block is read back by ``QWenConfig.__init__``
(``MoeConfig.from_dict``), so it is written RENORMALIZE where HF normalises and NONE otherwise.

Refused: layers without experts (``mlp_only_layers``, ``decoder_sparse_step`` > 1: TensorRT-LLM
1.2 builds experts in every layer), sliding windows (its Qwen converter writes none), Qwen2-MoE
without q/k/v biases and Qwen3-MoE with attention biases (its ``attn_bias`` is fixed per type).
"""
from __future__ import annotations

from common.errors import UserError
from model.spec import (COLUMN, EXPERT_COLUMN, EXPERT_ROW, HF_LAYER, NORMALIZATION_NONE,
                        NORMALIZATION_RENORMALIZE, REPLICATED, ROW, TRT_LAYER, Family, Linear,
                        Rule)

from .llama import ATTENTION, EMBED, HEAD, NORMS
from .qwen3 import QK_NORMS

_E = "mlp.experts.{e}."
_POST = "post_attention_layernorm"

EXPERTS = (
    Linear("mlp.fc", (_E + "up_proj", _E + "gate_proj"), EXPERT_COLUMN, (("inter", "hidden"),) * 2,
           group="experts", norm=_POST, experts=True),
    Linear("mlp.proj", (_E + "down_proj",), EXPERT_ROW, (("hidden", "inter"),), group="experts",
           experts=True),
)

_S = "mlp.shared_expert."
SHARED_EXPERT = (
    Linear("mlp.shared_expert.fc", (_S + "up_proj", _S + "gate_proj"), COLUMN,
           (("shared_inter", "hidden"),) * 2, group="shared_expert", norm=_POST),
    Linear("mlp.shared_expert.proj", (_S + "down_proj",), ROW, (("hidden", "shared_inter"),)),
)

ROUTER = Rule(TRT_LAYER + "mlp.router.weight", (HF_LAYER + "mlp.gate.weight",), REPLICATED,
              dtype="float32", shapes=(("experts", "hidden"),))
SHARED_GATE = Rule(TRT_LAYER + "mlp.shared_expert_gate.weight",
                   (HF_LAYER + "mlp.shared_expert_gate.weight",), REPLICATED,
                   shapes=(("one", "hidden"),))

#: (quant_algo, kv_cache_quant_algo) proven per target (tests/test_qwen_moe.py,
#: tests/test_qwen_moe_quant.py: tensor for tensor modelopt 0.47's export); refused before any
#: work otherwise (Family.formats): SmoothQuant (as for every MoE, quantize/moe.py). INT4-AWQ
#: calibrates the experts on transformers 4's per-expert block built from this spec
#: (quantize/moe_blocks.py); on --target pytorch what modelopt's unified export writes for MoE and
#: tests/test_moe_pytorch_target.py compares with it
FORMATS = {"engine": ((None, None), ("FP8", None), ("FP8", "FP8"), ("W8A16", None),
                      ("W8A16", "INT8"), ("W4A16", None), ("W4A16", "INT8"), (None, "INT8"),
                      (None, "FP8"), ("W4A16_AWQ", None), ("W4A16_AWQ", "INT8"),
                      ("W4A16_AWQ", "FP8")),
           "pytorch": ((None, None), ("FP8", None), ("FP8", "FP8"), ("W8A16", None),
                       (None, "FP8"))}

_WINDOW = ("use_sliding_window", True, "TensorRT-LLM 1.2's Qwen converter writes no sliding "
                                       "attention window")


def qwen_moe(hf) -> dict:
    """The experts' Shape fields: HF num_experts, num_experts_per_tok, moe_intermediate_size
    (the experts' width: ``inter``), shared_expert_intermediate_size, and the routing
    normalisation that equals HF's (module docstring)."""
    arch = hf.architectures[0]
    dense = list(getattr(hf, "mlp_only_layers", None) or [])
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    if dense or step != 1:
        what = f"mlp_only_layers {dense}" if dense else f"decoder_sparse_step {step}"
        raise UserError(f"{arch} with {what} in config.json is not supported: TensorRT-LLM 1.2's "
                        f"QWenDecoderLayer builds experts in every layer (no dense MLP layers); "
                        f"only models with experts in every layer convert")
    experts = int(hf.num_experts)
    if experts < 2:
        raise UserError(f"{arch} with num_experts {experts} in config.json is not supported: "
                        f"TensorRT-LLM's MoeConfig.has_moe needs more than one expert")
    norm = NORMALIZATION_RENORMALIZE if getattr(hf, "norm_topk_prob", False) else NORMALIZATION_NONE
    return dict(experts=experts, top_k=int(hf.num_experts_per_tok), moe_normalization=norm,
                inter=int(hf.moe_intermediate_size),
                shared_inter=int(getattr(hf, "shared_expert_intermediate_size", 0) or 0))


def _fields(qwen_type: str):
    def fields(hf, shape, tp: int) -> dict:
        """What QWenConfig.from_hugging_face adds for qwen2_moe / qwen3_moe: qwen_type,
        seq_length, HF's intermediate_size (the dense width, which the MoE layers do not use),
        moe_intermediate_size and moe_shared_expert_intermediate_size."""
        return {"qwen_type": qwen_type, "seq_length": getattr(hf, "seq_length", 8192),
                "intermediate_size": int(hf.intermediate_size),
                "moe_intermediate_size": shape.inter,
                "moe_shared_expert_intermediate_size": shape.shared_inter}
    return fields


QWEN2_MOE = Family(
    "qwen2_moe", ("Qwen2MoeForCausalLM",), EMBED, ATTENTION + EXPERTS + SHARED_EXPERT, NORMS, HEAD,
    extra=(ROUTER, SHARED_GATE),
    flags=(("attn_bias", True), ("dense_bias", False)),
    trtllm_config=_fields("qwen2_moe"),
    unsupported=(
        ("qkv_bias", False, "TensorRT-LLM 1.2 builds Qwen2-MoE attention with q/k/v biases "
                            "(QWenConfig.from_hugging_face: attn_bias true)"),
        _WINDOW),
    formats=FORMATS,
    moe=qwen_moe,
    hidden_padding="TensorRT-LLM's MoE experts (layers/moe.py) are not padded, so their hidden "
                   "features would not meet the padded residual stream")

QWEN3_MOE = Family(
    "qwen3_moe", ("Qwen3MoeForCausalLM",), EMBED, ATTENTION + EXPERTS, NORMS, HEAD,
    extra=(ROUTER,),
    flags=(("attn_bias", False), ("dense_bias", False)),
    qk_norms=QK_NORMS,
    trtllm_config=_fields("qwen3_moe"),
    unsupported=(
        ("attention_bias", True, "TensorRT-LLM 1.2 builds Qwen3-MoE attention without q/k/v and "
                                 "o_proj biases (QWenConfig.from_hugging_face: attn_bias false)"),
        _WINDOW),
    formats=FORMATS,
    moe=qwen_moe,
    hidden_padding=QWEN2_MOE.hidden_padding)
