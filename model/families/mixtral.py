"""Mixtral (``tensorrt_llm/models/llama/convert.py``, the has_moe_tp() path): attention and norms
as Llama; the router unquantized, unsplit, float32; experts stacked over the rank's
expert-parallel block into [E_local, 2*I/moe_tp, H] with each expert's w3 (up) slice FIRST, then
w1 (gate; SiLU branch), the inverse of dense Llama's fc/gate naming, and w2 into
[E_local, H, I/moe_tp]."""
from __future__ import annotations

from model.spec import (EXPERT_COLUMN, EXPERT_ROW, HF_LAYER, NORMALIZATION_RENORMALIZE,
                        REPLICATED, TRT_LAYER, Family, Linear, Rule)

from .llama import ATTENTION, EMBED, HEAD, NORMS

_E = "block_sparse_moe.experts.{e}."

EXPERTS = (
    Linear("mlp.fc", (_E + "w3", _E + "w1"), EXPERT_COLUMN, (("inter", "hidden"),) * 2,
           group="experts", norm="post_attention_layernorm", experts=True),
    Linear("mlp.proj", (_E + "w2",), EXPERT_ROW, (("hidden", "inter"),), group="experts",
           experts=True),
)

ROUTER = Rule(TRT_LAYER + "mlp.router.weight", (HF_LAYER + "block_sparse_moe.gate.weight",),
              REPLICATED, dtype="float32", shapes=(("experts", "hidden"),))



def mixtral_moe(hf) -> dict:
    """num_local_experts, num_experts_per_tok; top-k then softmax (RENORMALIZE), as TensorRT-LLM's
    LLaMAConfig.from_hugging_face sets for model_type mixtral."""
    return dict(experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                moe_normalization=NORMALIZATION_RENORMALIZE)


MIXTRAL = Family("mixtral", ("MixtralForCausalLM",), EMBED, ATTENTION + EXPERTS, NORMS, HEAD,
                 extra=(ROUTER,), moe=mixtral_moe,
                 hidden_padding="TensorRT-LLM's MoE experts (layers/moe.py) are not padded, so "
                                "their hidden features would not meet the padded residual stream")
