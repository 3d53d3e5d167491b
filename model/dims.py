"""The sizes a family spec names (``model.spec.Linear.shapes``), read off a model's ``Shape``, and
which feature dims zero padding leaves exact (model.spec re-exports them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MlaDims:
    """Multi-head latent attention's sizes (HF DeepseekV2Config names): q_lora_rank (0: none),
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim."""

    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v: int


#: sizes a spec names, read off the model's Shape
DIMS = {
    "q": lambda s: s.heads * s.head_size,
    "kv": lambda s: s.kv_heads * s.head_size,
    "hidden": lambda s: s.hidden,
    "inter": lambda s: s.inter,
    "vocab": lambda s: s.vocab,
    "experts": lambda s: s.experts,
    "head": lambda s: s.head_size,
    # multi-head latent attention (Shape.mla) and DeepSeek's experts
    "q_lora": lambda s: s.mla.q_lora,
    "kv_lora": lambda s: s.mla.kv_lora,
    "kv_a": lambda s: s.mla.kv_lora + s.mla.rope,          # kv_a_proj_with_mqa's outputs
    "mla_q": lambda s: s.heads * (s.mla.nope + s.mla.rope),  # q_proj / q_b_proj outputs
    "mla_kv": lambda s: s.heads * (s.mla.nope + s.mla.v),    # kv_b_proj outputs
    "mla_o": lambda s: s.heads * s.mla.v,                    # o_proj inputs
    "moe_inter": lambda s: s.expert_inter,
    "shared_inter": lambda s: s.shared_inter,  # a MoE layer's shared expert(s) (DeepSeek, Qwen2-MoE)
    "one": lambda s: 1,                         # a gate of one output (shared_expert_gate)
}

#: the sizes as the TensorRT-LLM checkpoint lays them out: heads padded (--pad-heads), the MLP's
#: intermediate features padded as TensorRT-LLM's weight-only / AWQ linears declare them
RANK_DIMS = {
    "q": lambda s: s.tp_heads * s.head_size,
    "kv": lambda s: s.tp_kv_heads * s.head_size,
    "inter": lambda s: getattr(s, "tp_inter", None) or s.inter,
    "hidden": lambda s: getattr(s, "tp_hidden", None) or s.hidden,
}

#: feature dims that zero padding leaves exact: produced only by column-parallel linears and read
#: only by a row-parallel one of the same block (the MLP's intermediate features: fc/gate -> proj),
#: so zero features in every producer and consumer change no output. The hidden features (every
#: linear's input or output, the residual stream) and the attention's q/k/v heads are not.
PADDABLE_DIMS = frozenset({"inter"})

#: feature dims whose zero padding is exact once every RMSNorm over them is rescaled: the hidden
#: features (the residual stream). Zero embedding columns start it at zero, zero output rows of
#: dense / proj keep it there and zero input columns of every reader ignore it; RMSNorm's mean
#: over H' features is (H / H') x the mean over H, so ``norm_epsilon`` x H / H' and each norm
#: weight (``Rule.rms_norm``) x sqrt(H / H') give the same output (quantize.apply.pad_features,
#: convert.plan, ``Family.hidden_padding``).
RESCALED_DIMS = frozenset({"hidden"})
