"""transformers 4.57's per-expert Mixtral MoE block, rebuilt from transformers 5's fused one for
INT4-AWQ calibration (the extraction is quantize/moe_awq.py).

Why: nvidia-modelopt 0.47's ``awq_lite`` searches scales for ``nn.Linear``-like quantized modules
only, and transformers 5 fuses a layer's experts into one ``MixtralExperts`` (3-D ``gate_up_proj`` /
``down_proj``), which it skips: those experts would be plain round-to-nearest INT4, not AWQ.
:func:`unfuse_experts` puts back transformers 4.57's ``MixtralSparseMoeBlock`` shape (``gate`` an
``nn.Linear``, ``experts`` a ``ModuleList`` of ``w1``/``w2``/``w3`` linears, ``top_k`` and
``num_experts`` on the block) with its forward's op order (routing softmax in float, top-k,
renormalise, cast, per-expert loop with ``index_add_``), so modelopt wraps and calibrates it as it
does a transformers-4 Mixtral (``_QuantSparseSequentialMoe`` + one ``_QuantLinear`` per expert
projection). Only the MoE blocks change; memory grows by one layer's experts at a time.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantSpec

Tensor = torch.Tensor


class Hf4MixtralExpert(nn.Module):
    """transformers 4.57's ``MixtralBlockSparseTop2MLP``: w2(act(w1 x) * w3 x)."""

    def __init__(self, w1: Tensor, w2: Tensor, w3: Tensor, act_fn):
        super().__init__()
        self.w1 = _linear(w1)
        self.w2 = _linear(w2)
        self.w3 = _linear(w3)
        self.act_fn = act_fn

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.w2(self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states))


class Hf4MixtralSparseMoeBlock(nn.Module):
    """transformers 4.57's ``MixtralSparseMoeBlock`` (inference forward), built from transformers
    5's fused one; returns only the hidden states, as transformers 5's decoder layer expects.
    ``tokens_seen``: per expert, how many (token, slot) pairs were routed to it."""

    def __init__(self, fused_block: nn.Module):
        super().__init__()
        router, experts = fused_block.gate, fused_block.experts
        self.num_experts, self.hidden_dim = router.weight.shape
        self.ffn_dim = experts.down_proj.shape[-1]
        self.top_k = router.top_k
        self.gate = _linear(router.weight)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        inter = self.ffn_dim  # gate_up_proj = [w1 (gate); w3 (up)] per expert
        self.experts = nn.ModuleList(
            Hf4MixtralExpert(gate_up[e, :inter], down[e], gate_up[e, inter:], experts.act_fn)
            for e in range(self.num_experts))
        self.tokens_seen = [0] * self.num_experts

    def forward(self, hidden_states: Tensor) -> Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                            device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for e, n in enumerate(expert_mask.sum(dim=(-1, -2)).tolist()):
            self.tokens_seen[e] += n
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final.reshape(batch_size, sequence_length, hidden_dim)


def _linear(weight: Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


_MLP = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp$")


def unfuse_experts(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """For AWQ, replace (in place) every transformers-5 fused Mixtral MoE block by
    :class:`Hf4MixtralSparseMoeBlock` before modelopt calibrates; other formats and models with no
    fused experts are left as they are. Returns ``model``."""
    if not spec.format.moe.unfused_calibration:  # the recipe's MoE support says (AWQ)
        return model
    names = [n for n, m in model.named_modules()
             if _MLP.match(n) and isinstance(getattr(getattr(m, "experts", None), "gate_up_proj",
                                                     None), Tensor)]
    for name in names:  # one layer at a time: its fused experts are freed once replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Hf4MixtralSparseMoeBlock(getattr(parent, child)))
    return model




def unfused_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: :class:`Hf4MixtralSparseMoeBlock`} of a model :func:`unfuse_experts` changed."""
    return {int(m.group(1)): mod for n, mod in model.named_modules()
            if (m := _MLP.match(n)) and isinstance(mod, Hf4MixtralSparseMoeBlock)}
