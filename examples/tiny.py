"""Tiny random Hugging Face models of the supported families, for tests and quick trials.

``make_tiny_model(path, family="llama", **overrides)`` writes a real HF directory
(config.json + safetensors, optionally sharded with an index) with random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

_BASE = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
_GEMMA_BASE = dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                   final_logit_softcapping=5.0, tie_word_embeddings=True)
#: DeepSeek-V2-Lite in miniature: no q-LoRA, MLA dims of its proportions (kv_lora_rank + rope =
#: 64; v_head_dim = qk_nope_head_dim, as in every released DeepSeek-V2), layer 0 dense then 2 MoE
#: layers of 8 routed + 2 shared experts, V2-Lite's yarn (mscale = mscale_all_dim) over a 64-token
#: original context
_DEEPSEEK_V2_LITE = dict(
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
    q_lora_rank=None, kv_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=64,
    first_k_dense_replace=1, topk_method="greedy", architectures=["DeepseekV2ForCausalLM"],
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707))
#: DeepSeek-V2 in miniature: q-LoRA, group-limited routing scaled as V2's, mscale != mscale_all_dim
DEEPSEEK_V2_QLORA = dict(
    q_lora_rank=64, topk_method="group_limited_greedy", n_group=4, topk_group=1,
    routed_scaling_factor=2.0,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=0.8))
#: DeepSeek-V3 / R1 in miniature: q-LoRA, noaux_tc routing (sigmoid scores, the correction bias,
#: 4 groups of 2 experts, the best 2 groups kept, renormalised and scaled by 2.5), 1 dense + 2 MoE
#: layers of 8 routed + 1 shared expert; hidden 192 and expert width 160: dims that are not
#: multiples of the FP8 variant's 128 blocks, so partial blocks are read
_DEEPSEEK_V3 = dict(
    hidden_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=320, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, moe_intermediate_size=160, first_k_dense_replace=1, n_group=4,
    topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    architectures=["DeepseekV3ForCausalLM"])
#: what a family's tiny model sets beyond _BASE
_FAMILY_BASE = {
    "deepseek_v2": _DEEPSEEK_V2_LITE,
    "deepseek_v3": _DEEPSEEK_V3,
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3": dict(head_dim=16),
    # experts narrower than the dense width (which the MoE layers do not use), as released
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                      norm_topk_prob=True),
    "gemma3": dict(_GEMMA_BASE, layer_types=["sliding_attention", "full_attention"] * 2,
                   architectures=["Gemma3ForCausalLM"]),
    "gemma2": dict(_GEMMA_BASE, attn_logit_softcapping=2.0, architectures=["Gemma2ForCausalLM"]),
    # Phi-4-mini-like: partial rotary (12 of 16 dims), LongRoPE switching to its long factors
    # past 32 tokens, tied embeddings, 4 heads over 2 KV heads
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                 max_position_embeddings=131072, original_max_position_embeddings=32,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                               "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]}),
}
#: family -> transformers ``model_type`` where they differ (Gemma 3's text-only config)
_MODEL_TYPE = {"gemma3": "gemma3_text"}
#: config.json keys transformers 5 writes under another name than the Hub's released models (and
#: transformers 4) use: Qwen3MoeConfig's attribute_map num_experts -> num_local_experts
_HUB_KEYS = {"qwen3_moe": {"num_local_experts": "num_experts"}}


def make_tiny_model(path, family: str = "llama", seed: int = 0, dtype=torch.float32,
                    max_shard_size: str | None = None, **overrides):
    """Write a random tiny model of ``family`` (llama, mistral, qwen2, mixtral, qwen3, gemma3,
    gemma2, qwen2_moe, qwen3_moe; built through ``AutoConfig.for_model`` from its transformers ``model_type``) to
    ``path``; return the model. Mixtral: 4 experts, top 2 unless overridden; saved in the Hub's
    per-expert layout (``block_sparse_moe.experts.{e}.w1/w2/w3``), which transformers 5 writes
    back on save; Qwen2-MoE / Qwen3-MoE likewise (``mlp.experts.{e}.gate_proj/up_proj/down_proj``):
    4 experts of width 32, top 2, Qwen2-MoE with a shared expert of width 48, Qwen3-MoE
    normalising the top-k probabilities (``norm_topk_prob``, as the released models). Qwen3: head_dim 16, not hidden / heads (8). Gemma: 4 layers alternating
    sliding/full attention with a window of 4 tokens, head_dim 16 != hidden / heads, soft-capping
    small enough to bite. Phi-3: Phi-4-mini's shape in small (partial rotary, LongRoPE with an
    original context of 32 tokens, tied embeddings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(_BASE, **_FAMILY_BASE.get(family, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(_MODEL_TYPE.get(family, family), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init has tiny std; widen it so errors are visible in logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():  # DeepSeek-V3's router correction bias (zeros)
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    model = model.to(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    if family in _HUB_KEYS:
        _hub_keys(path / "config.json", _HUB_KEYS[family])
    return model


def _hub_keys(config_json: Path, renames: dict) -> None:
    import json

    raw = json.loads(config_json.read_text())
    config_json.write_text(json.dumps({renames.get(k, k): v for k, v in raw.items()}, indent=2))
