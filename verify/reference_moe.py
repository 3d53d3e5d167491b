"""Mixture-of-experts layers for the CPU reference reader (verify/model.py), with TensorRT-LLM's
semantics (``tensorrt_llm/layers/moe.py`` ``MixtureOfExperts``; docs/trtllm-format.md, MoE):

* router: ``mlp.router.weight`` [num_experts, hidden], float32, the same on every rank; the
  logits are computed in float32 from the normed hidden state;
* routing by ``moe.normalization_mode``: NONE (0) softmax over all experts then the top-k
  probabilities as they are; RENORMALIZE (1, Mixtral) top-k logits then softmax over those k;
* experts: rank ``t`` holds the experts ``[ep_rank*E/ep, (ep_rank+1)*E/ep)`` (``moe_ep_rank =
  t % moe_ep_size``) and of each the ``moe_tp_rank = t // moe_ep_size`` slice of the intermediate
  dimension: ``mlp.fc.weight`` [E_local, 2*I/moe_tp, H] = [w3 (up); w1 (gate)], ``swiglu`` =
  silu(second half) * first half, ``mlp.proj.weight`` [E_local, H, I/moe_tp];
* each rank's routed, weighted sum over its own experts and slices is a partial result; the ranks'
  partials are summed (all-reduce), as for a row-parallel linear;
* DeepSeek-V3's ``noaux_tc`` (config ``topk_method``; TensorRT-LLM PyTorch backend's
  ``Deepseekv3RoutingImpl``, transformers 5 ``DeepseekV3MoE.route_tokens_to_experts``): sigmoid
  scores; for the choice only, plus ``mlp.router.e_score_correction_bias``, groups ranked by the
  sum of their two best, the best ``topk_group`` kept, top-k of those; the weights are the chosen
  sigmoid scores, renormalised (mode 4, DEVICE_LIMITED_RENORM: ``norm_topk_prob``) and times
  ``device_limited_routed_scaling_factor``;
* Qwen2-MoE (``qwen_type`` qwen2_moe: ``SharedMoE`` with ``use_shared_gate``): a shared expert
  that every token takes, a tp-split MLP ``mlp.shared_expert.fc`` [2*S/tp, H] = [up; gate] per
  rank, swiglu, ``mlp.shared_expert.proj`` [H, S/tp] (row-parallel, no all-reduce of its own),
  scaled by ``sigmoid(mlp.shared_expert_gate(x))`` (``RowLinear(hidden, 1)``, tp 1, the model
  dtype) and added to the rank's routed partial before the one all-reduce.

An expert's linear runs through the reader's linear kernels with that expert's tensors
(``expert_params``), so quantized formats plug in through the same ``LINEAR_KERNELS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from common.errors import UserError

Tensor = torch.Tensor

NORMALIZATION_MODES = {0: "NONE", 1: "RENORMALIZE", 3: "DEVICE_LIMITED"}


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    normalization_mode: int
    moe_tp: int
    moe_ep: int
    #: DEVICE_LIMITED (DeepSeek-V2's group_limited_greedy): softmax, keep the experts of the
    #: ``topk_group`` groups (of ``n_group``) with the highest expert score, top-k of those,
    #: times ``scaling`` (device_limited_routed_scaling_factor); n_group 0: no group limit
    n_group: int = 0
    topk_group: int = 0
    scaling: float = 1.0
    shared_expert: bool = False  # Qwen2-MoE's gated shared expert (SharedMoE)
    noaux: bool = False          # DeepSeek-V3's noaux_tc routing (sigmoid, correction bias)

    @classmethod
    def from_config(cls, c: dict, tp: int, where) -> "MoeSpec | None":
        """The checkpoint's MoE settings (``moe`` block, or the legacy flat ``moe_*`` keys)."""
        moe = c.get("moe") or {}
        experts = int(moe.get("num_experts", c.get("moe_num_experts", 0)) or 0)
        if experts <= 0:
            return None
        top_k = int(moe.get("top_k", c.get("moe_top_k", 0)) or 0)
        mode = moe.get("normalization_mode", c.get("moe_normalization_mode", 1))
        mode = 1 if mode is None else int(mode)
        noaux = c.get("topk_method") == "noaux_tc"
        if mode not in NORMALIZATION_MODES and not (noaux and mode == 4):
            raise UserError(f"{where}: moe.normalization_mode {mode} is not supported by the "
                            f"reference reader (supported: 0 NONE, 1 RENORMALIZE, "
                            f"3 DEVICE_LIMITED)")
        if not 1 <= top_k <= experts:
            raise UserError(f"{where}: moe.top_k {top_k} must lie in [1, num_experts {experts}]")
        m = c.get("mapping") or {}
        moe_tp = int(m.get("moe_tp_size") or tp)
        moe_ep = int(m.get("moe_ep_size") or max(1, tp // moe_tp))
        if moe_tp * moe_ep != tp or experts % moe_ep:
            raise UserError(f"{where}: mapping moe_tp_size {moe_tp} x moe_ep_size {moe_ep} must "
                            f"equal tp_size {tp} and divide num_experts {experts}")
        return cls(experts, top_k, mode, moe_tp, moe_ep, int(moe.get("device_limited_n_group") or 0),
                   int(moe.get("device_limited_topk_group") or 0),
                   float(moe.get("device_limited_routed_scaling_factor") or 1.0),
                   shared_expert=c.get("qwen_type") == "qwen2_moe", noaux=noaux)

    def local_experts(self, t: int) -> range:
        per = self.num_experts // self.moe_ep
        ep_rank = t % self.moe_ep
        return range(ep_rank * per, (ep_rank + 1) * per)


def route(x: Tensor, router_w: Tensor, spec: MoeSpec,
          bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(expert ids [tokens, k], weights [tokens, k] float32) for ``x`` [tokens, hidden];
    ``bias``: noaux_tc's e_score_correction_bias."""
    logits = x.float() @ router_w.float().t()
    if spec.noaux:
        return _noaux_tc(logits, bias, spec)
    if spec.normalization_mode == 1:  # RENORMALIZE: top-k, then softmax over the k
        top, ids = torch.topk(logits, spec.top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1)
    probs = torch.softmax(logits, dim=-1)  # NONE: softmax, then the top-k as they are
    if spec.normalization_mode == 3 and spec.n_group:
        groups = probs.view(-1, spec.n_group, spec.num_experts // spec.n_group)
        keep = torch.topk(groups.max(dim=-1).values, spec.topk_group, dim=-1).indices
        mask = torch.zeros_like(groups[..., 0]).scatter_(1, keep, 1.0).bool()
        probs = probs.masked_fill(~mask.repeat_interleave(groups.shape[-1], dim=1), 0.0)
    top, ids = torch.topk(probs, spec.top_k, dim=-1)
    return ids, top * spec.scaling if spec.normalization_mode == 3 else top


def _noaux_tc(logits: Tensor, bias: Tensor | None, spec: MoeSpec) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3's routing (module docstring)."""
    if bias is None:
        raise UserError("topk_method noaux_tc needs mlp.router.e_score_correction_bias")
    scores = torch.sigmoid(logits)
    choice = scores + bias.float()
    if spec.n_group:
        groups = choice.view(-1, spec.n_group, spec.num_experts // spec.n_group)
        keep = torch.topk(groups.topk(2, dim=-1).values.sum(-1), spec.topk_group, dim=-1).indices
        mask = torch.zeros_like(groups[..., 0]).scatter_(1, keep, 1.0).bool()
        choice = choice.masked_fill(~mask.repeat_interleave(groups.shape[-1], dim=1), 0.0)
    ids = torch.topk(choice, spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.normalization_mode == 4:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * spec.scaling


def expert_params(params: Mapping[str, Tensor], j: int, e_local: int) -> dict[str, Tensor]:
    """Expert ``j``'s tensors out of a stacked module's (first dim = experts on this rank, NVFP4's
    weight globals [E] included); the activation scale, one [1] shared by the experts (FP8,
    NVFP4: the plugin quantizes every expert's input alike), as it is."""
    out = {}
    for k, v in params.items():
        per_expert = k == "weight" or (k != "activation_scaling_factor" and v.dim() >= 1
                                       and v.shape[0] == e_local)
        out[k] = v[j] if per_expert else v
    return out


def moe_partial(x: Tensor, params: Mapping[str, Mapping[str, Tensor]], spec: MoeSpec, t: int,
                linear, qcfg, prefix: str) -> Tensor:
    """Rank ``t``'s partial MoE output for ``x`` [batch, seq, hidden] (before the all-reduce).

    ``params``: module suffix ('router', 'fc', 'proj') -> that module's tensors on this rank;
    ``linear(x, params, qcfg, module, add_bias=False)``: the reader's kernel dispatch."""
    router = params["router"].get("weight")
    if router is None:
        raise UserError(f"tensor {prefix}.router.weight is missing")
    if tuple(router.shape[:1]) != (spec.num_experts,):
        raise UserError(f"{prefix}.router.weight has {router.shape[0]} rows, expected "
                        f"num_experts {spec.num_experts}")
    b, s, h = x.shape
    flat = x.reshape(-1, h)
    ids, weights = route(flat, router, spec, params["router"].get("e_score_correction_bias"))
    experts = spec.local_experts(t)
    fc, proj = params["fc"], params["proj"]
    for name, mod in (("fc", fc), ("proj", proj)):
        w = mod.get("weight")
        if w is None or w.shape[0] != len(experts):
            raise UserError(f"{prefix}.{name}.weight must stack this rank's {len(experts)} experts "
                            f"on dim 0, got {None if w is None else tuple(w.shape)}")
    out = torch.zeros_like(flat)
    for j, e in enumerate(experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = flat[tok]
        up_gate = linear(xe, expert_params(fc, j, len(experts)), qcfg, f"{prefix}.fc", add_bias=False)
        up, gate = up_gate.chunk(2, dim=-1)
        ye = linear(F.silu(gate) * up, expert_params(proj, j, len(experts)), qcfg,
                    f"{prefix}.proj", add_bias=False)
        out.index_add_(0, tok, (ye.float() * weights[tok, slot, None]).to(out.dtype))
    if spec.shared_expert:
        out = out + shared_partial(flat, params, linear, qcfg, prefix)
    return out.view(b, s, h)


def shared_partial(x: Tensor, params: Mapping[str, Mapping[str, Tensor]], linear, qcfg,
                   prefix: str) -> Tensor:
    """This rank's gated shared-expert partial for ``x`` [tokens, hidden] (module docstring)."""
    for m in ("shared_expert.fc", "shared_expert.proj", "shared_expert_gate"):
        if "weight" not in params.get(m, {}):
            raise UserError(f"tensor {prefix}.{m}.weight is missing (qwen_type qwen2_moe: "
                            f"TensorRT-LLM builds the gated shared expert)")
    up, gate = linear(x, params["shared_expert.fc"], qcfg, f"{prefix}.shared_expert.fc",
                      add_bias=False).chunk(2, dim=-1)
    y = linear(F.silu(gate) * up, params["shared_expert.proj"], qcfg,
               f"{prefix}.shared_expert.proj", add_bias=False)
    g = linear(x, params["shared_expert_gate"], qcfg, f"{prefix}.shared_expert_gate",
               add_bias=False)
    return torch.sigmoid(g) * y
