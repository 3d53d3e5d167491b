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
#: what a family's tiny model sets beyond _BASE
_FAMILY_BASE = {
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
    small enough to bite."""
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
