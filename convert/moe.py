"""Mixture of experts: the expert-parallel layout, its preflight and the checkpoint's ``moe`` block.

TensorRT-LLM (``tensorrt_llm/mapping.py``, ``layers/moe.py``, ``models/llama/convert.py``) splits
the experts of a MoE layer over the tp ranks in two ways at once: ``moe_tp_size`` splits every
expert's intermediate dimension, ``moe_ep_size`` hands each rank a contiguous block of whole
experts; ``moe_tp_size * moe_ep_size == tp_size``. Rank ``tp_rank`` has
``moe_tp_rank = tp_rank // moe_ep_size`` and ``moe_ep_rank = tp_rank % moe_ep_size``.
Defaults as TensorRT-LLM's ``Mapping``: neither given → moe_tp = tp, moe_ep = 1; one given → the
other is tp divided by it.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError



@dataclass(frozen=True)
class MoeLayout:
    moe_tp: int
    moe_ep: int

    def ranks(self, tp_rank: int) -> tuple[int, int]:
        """(moe_tp_rank, moe_ep_rank) of tp rank ``tp_rank``."""
        return tp_rank // self.moe_ep, tp_rank % self.moe_ep

    def experts(self, num_experts: int, tp_rank: int) -> range:
        """The experts tp rank ``tp_rank`` holds: its expert-parallel block, in order."""
        per = num_experts // self.moe_ep
        ep_rank = self.ranks(tp_rank)[1]
        return range(ep_rank * per, (ep_rank + 1) * per)


def _divisors(n: int, limit: int) -> str:
    return ", ".join(str(d) for d in range(1, limit + 1) if n % d == 0)


def moe_layout(shape, tp: int, moe_tp: int | None = None, moe_ep: int | None = None) -> MoeLayout:
    """The MoE split for ``--tp tp --moe-tp moe_tp --moe-ep moe_ep``, refused in one line (before
    any work) where TensorRT-LLM would fail: experts % moe_ep, intermediate % moe_tp, and
    moe_tp x moe_ep != tp. A model without experts takes no --moe-* flags."""
    experts = getattr(shape, "experts", 0)
    if not experts:
        if moe_tp is not None or moe_ep is not None:
            raise UserError("--moe-tp/--moe-ep apply to mixture-of-experts models (e.g. Mixtral); "
                            "this model has no experts: drop them")
        return MoeLayout(tp, 1)
    for flag, v in (("--moe-tp", moe_tp), ("--moe-ep", moe_ep)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1 (got {v})")
    if moe_tp is None and moe_ep is None:
        moe_tp, moe_ep = tp, 1
    elif moe_tp is None:
        moe_tp = max(1, tp // moe_ep)
    elif moe_ep is None:
        moe_ep = max(1, tp // moe_tp)
    if experts % moe_ep:
        raise UserError(f"--moe-ep {moe_ep}: the model's {experts} experts are not divisible by "
                        f"it (each rank holds experts / moe_ep whole experts); valid --moe-ep "
                        f"values: {_divisors(experts, min(experts, tp))}")
    inter = getattr(shape, "expert_inter", shape.inter)
    if inter % moe_tp:
        raise UserError(f"--moe-tp {moe_tp}: the experts' intermediate size {inter} is not "
                        f"divisible by it; valid --moe-tp values: {_divisors(inter, tp)}")
    if moe_tp * moe_ep != tp:
        raise UserError(f"--moe-tp {moe_tp} x --moe-ep {moe_ep} = {moe_tp * moe_ep} but --tp is "
                        f"{tp}: the experts are split over the tp ranks, so moe_tp x moe_ep must "
                        f"equal tp (e.g. --moe-tp {tp} --moe-ep 1)")
    return MoeLayout(moe_tp, moe_ep)


def moe_config(shape) -> dict:
    """The checkpoint's ``moe`` block, as modelopt 0.47 writes it (TensorRT-LLM's ``MoeConfig``
    fills the other fields with its defaults)."""
    return {"num_experts": shape.experts, "top_k": shape.top_k,
            "normalization_mode": shape.moe_normalization}

