"""transformers 4.57's per-expert sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE), rebuilt from
transformers 5's fused one for INT4-AWQ calibration (the extraction is quantize/moe_awq.py).

Why: nvidia-modelopt 0.47's ``awq_lite`` searches scales for ``nn.Linear``-like quantized modules
only, and transformers 5 fuses a layer's experts into one module (3-D ``gate_up_proj`` /
``down_proj``), which it skips: those experts would be plain round-to-nearest INT4, not AWQ.
:func:`unfuse_experts` puts back transformers 4.57's ``*SparseMoeBlock`` shape (``gate`` an
``nn.Linear``, ``experts`` a ``ModuleList`` of per-expert gate / up / down linears, ``top_k`` and
``num_experts`` on the block) with its forward's op order (routing softmax in float, top-k,
renormalised where the family's routing is RENORMALIZE, cast, per-expert loop with
``index_add_``, then a shared expert scaled by the sigmoid of its gate where the block has one),
so modelopt wraps and calibrates it as it does a transformers-4 model
(``_QuantSparseSequentialMoe`` + one ``_QuantLinear`` per expert projection).

Everything family-specific comes from the family spec (model/families/): the expert linears'
names are the leaf names of its expert ``Linear`` sources (``mlp.fc`` = [up; gate], ``mlp.proj``
= down: Mixtral's ``w3`` / ``w1`` / ``w2``, Qwen-MoE's ``up_proj`` / ``gate_proj`` /
``down_proj``), the renormalisation its ``moe(config)``'s ``moe_normalization``. A shared expert
and its gate (Qwen2-MoE's ``shared_expert`` / ``shared_expert_gate``, transformers' name for it in
every MoE block that has one) are moved over as they are: they are already ``nn.Linear`` modules.
Only the MoE blocks change; memory grows by one layer's experts at a time.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from model.spec import NORMALIZATION_RENORMALIZE

from .formats import QuantSpec
from .modelopt_state import model_family

Tensor = torch.Tensor


def expert_names(family) -> tuple[str, str, str]:
    """(gate, up, down): one expert's linear names in ``family``'s spec (the last dotted part of
    its expert ``mlp.fc`` sources [up, gate] and ``mlp.proj`` source)."""
    lins = {lin.name: lin for lin in family.linears if lin.experts}
    up, gate = (h.rsplit(".", 1)[-1] for h in lins["mlp.fc"].hf)
    return gate, up, lins["mlp.proj"].hf[0].rsplit(".", 1)[-1]


class Hf4Expert(nn.Module):
    """One transformers-4.57 expert MLP: down(act(gate x) * up x), its linears named ``names``
    (gate, up, down)."""

    def __init__(self, names: tuple[str, str, str], gate: Tensor, up: Tensor, down: Tensor,
                 act_fn):
        super().__init__()
        self.names = names
        for name, w in zip(names, (gate, up, down)):
            setattr(self, name, _linear(w))
        self.act_fn = act_fn

    def forward(self, hidden_states: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(hidden_states)) * up(hidden_states))


class Hf4SparseMoeBlock(nn.Module):
    """transformers 4.57's sparse MoE block (inference forward), built from transformers 5's fused
    one; returns only the hidden states, as transformers 5's decoder layer expects.
    ``tokens_seen``: per expert, how many (token, slot) pairs were routed to it."""

    def __init__(self, fused_block: nn.Module, names: tuple[str, str, str], renormalize: bool):
        super().__init__()
        router, experts = fused_block.gate, fused_block.experts
        self.num_experts, self.hidden_dim = router.weight.shape
        self.ffn_dim = experts.down_proj.shape[-1]
        self.top_k = router.top_k
        self.renormalize = renormalize
        self.names = names
        self.gate = _linear(router.weight)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        inter = self.ffn_dim  # gate_up_proj = [gate; up] per expert
        self.experts = nn.ModuleList(
            Hf4Expert(names, gate_up[e, :inter], gate_up[e, inter:], down[e], experts.act_fn)
            for e in range(self.num_experts))
        for extra in ("shared_expert", "shared_expert_gate"):
            if isinstance(getattr(fused_block, extra, None), nn.Module):
                setattr(self, extra, getattr(fused_block, extra))
        self.tokens_seen = [0] * self.num_experts

    def forward(self, hidden_states: Tensor) -> Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.renormalize:
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
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(hidden_states)
            if hasattr(self, "shared_expert_gate"):
                shared = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            final = final + shared
        return final.reshape(batch_size, sequence_length, hidden_dim)


def _linear(weight: Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


_MLP = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp$")


def unfuse_experts(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """For AWQ, replace (in place) every transformers-5 fused MoE block by
    :class:`Hf4SparseMoeBlock` (names and routing from the model's family spec) before modelopt
    calibrates; other formats and models with no fused experts are left as they are. Returns
    ``model``."""
    if not spec.format.moe.unfused_calibration:  # the recipe's MoE support says (AWQ)
        return model
    names = [n for n, m in model.named_modules()
             if _MLP.match(n) and isinstance(getattr(getattr(m, "experts", None), "gate_up_proj",
                                                     None), Tensor)]
    if not names:
        return model
    family = model_family(model)
    renorm = family.moe(model.config)["moe_normalization"] == NORMALIZATION_RENORMALIZE
    for name in names:  # one layer at a time: its fused experts are freed once replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Hf4SparseMoeBlock(getattr(parent, child), expert_names(family),
                                                 renorm))
    return model


def unfused_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: :class:`Hf4SparseMoeBlock`} of a model :func:`unfuse_experts` changed."""
    return {int(m.group(1)): mod for n, mod in model.named_modules()
            if (m := _MLP.match(n)) and isinstance(mod, Hf4SparseMoeBlock)}
