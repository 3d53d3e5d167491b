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
#: what a family's tiny model sets beyond _BASE
_FAMILY_BASE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
                "qwen3": dict(head_dim=16)}


def make_tiny_model(path, family: str = "llama", seed: int = 0, dtype=torch.float32,
                    max_shard_size: str | None = None, **overrides):
    """Write a random tiny model of ``family`` (a transformers ``model_type``: llama, mistral,
    qwen2, mixtral, qwen3) to ``path``; return the model. Mixtral: 4 experts, top 2 unless
    overridden; saved in the Hub's per-expert layout (``block_sparse_moe.experts.{e}.w1/w2/w3``),
    which transformers 5 writes back on save. Qwen3: head_dim 16, not hidden / heads (8)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(_BASE, **_FAMILY_BASE.get(family, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
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
    return model
