"""Formats quantized from the float weights alone (no calibration; e.g. FP8 rowwise): each rank's
planned float linear weights become the recipe's tensors (``Recipe.quantize_weight``), computed
when the writer reaches them, one linear at a time, from that rank's slice of the source.

The planned weight (``convert.plan.OutputTensor``: source pieces, the checkpoint dtype) is read
and cast to the checkpoint dtype first, as TensorRT-LLM's converters quantize the weights in the
dtype they convert to."""
from __future__ import annotations

import re

import torch

from convert.hf_config import pp_layer_range

from .apply import StagedTensor, apply_to_plan
from .torch_io import read_tensor

_LINEAR_WEIGHT = re.compile(r"^transformer\.layers\.(\d+)\.(.+)\.weight$")


def read_planned(source, t) -> torch.Tensor:
    """The tensor ``t`` (an OutputTensor) as the float plan writes it, in memory."""
    parts = []
    for p in t.pieces:
        x = torch.zeros(p.shape, dtype=t.dtype.torch) if p.source is None else \
            read_tensor(source, p.source, p.index).to(t.dtype.torch)
        if p.pad_cols:
            x = torch.cat([x, x.new_zeros((*x.shape[:-1], p.pad_cols))], dim=-1)
        parts.append(x)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class _Quantized:
    """The recipe's tensors of one planned weight, the last one computed kept (its weight and
    scale are written one after the other)."""

    def __init__(self, source, quant):
        self.source, self.quant, self._key, self._value = source, quant, None, None

    def get(self, t, suffix: str) -> torch.Tensor:
        if self._key != t.name:
            self._value = None
            self._value = self.quant.format.quantize_weight(self.quant, read_planned(self.source, t))
            self._key = t.name
        return self._value[suffix].contiguous()


def quantize_plans(cplan, shape, quant) -> None:
    """Replace, in every rank's plan of ``cplan``, the linears the recipe quantizes by its
    tensors (staged: computed when written)."""
    tp, pp = cplan.config["mapping"]["tp_size"], cplan.config["mapping"]["pp_size"]
    recipe = quant.format
    out = []
    for r, plan in enumerate(cplan.plans):
        first = pp_layer_range(shape.layers, pp, r // tp).start
        cache = _Quantized(cplan.source, quant)
        staged = {}
        for t in plan:
            m = _LINEAR_WEIGHT.match(t.name)
            if m is None or not recipe.quantizes_linear(quant, first + int(m.group(1)), shape.layers,
                                                         m.group(2)):
                continue
            prefix = t.name[:-len("weight")]
            for suffix, (tshape, dtype) in _layouts(recipe, quant, t).items():
                staged[prefix + suffix] = StagedTensor(
                    prefix + suffix, tshape, dtype, lambda t=t, s=suffix, c=cache: c.get(t, s))
        out.append(apply_to_plan(plan, staged))
    cplan.plans = out


def _layouts(recipe, quant, t) -> dict:
    """Shape and dtype of each tensor the recipe makes of ``t`` (from a one-row stand-in, so
    that the file headers are laid out before any weight is read)."""
    probe = recipe.quantize_weight(quant, torch.ones((1, *t.shape[1:]), dtype=t.dtype.torch))
    rows = t.shape[0]
    return {k: ((rows, *v.shape[1:]), v.dtype) for k, v in probe.items()}
