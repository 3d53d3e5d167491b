"""awq_lite's search pass for one decoder layer, with each alpha's fake-quantized weight made once
per linear instead of once per calibration batch.

modelopt's ``awq_lite`` (model_calib.py) patches every quantized linear's forward: in its search
pass each call computes the float output, then for each of the 11 alphas sets the pre-quant
scales, fake-quantizes the whole weight again and accumulates the squared error against the float
output. The weight's fake quantization does not depend on the batch, and on CPU it is the cost
(~0.45 s per 14336 x 4096 weight: at 8B shapes ~18 s per layer and batch). Here the layer's
search-pass forward runs with the linears' search switched off (their patched forward then returns
the float output, as it always does), their inputs recorded; then per linear, per alpha, the
weight is fake-quantized once by the linear's own quantizers and every recorded batch's error is
added in batch order -- the same operations on the same tensors, so the same losses and the same
best alpha bit for bit (tests/test_quantize_convert.py's AWQ cases against modelopt's export).
The inputs of every batch are held for the layer (calibration tokens x the linears' input widths).

This reads and fills awq_lite's per-module helper (``module.awq_lite``: act_scale, weight_scale,
loss, num_search_steps, is_enabled) as modelopt 0.47 defines it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _awq_scale(x_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """awq_lite's get_scale without tensor parallelism."""
    scales = (x_max.pow(alpha) / (w_max.to(x_max.device).pow(1 - alpha)
                                  + torch.finfo(torch.float32).tiny)).clamp(min=1e-4, max=1e4).view(-1)
    return (scales / (scales.max() * scales.min()).sqrt()).view(-1)


def _drop_pre_quant_scales(m) -> None:
    for q in (m.input_quantizer, m.weight_quantizer):
        if hasattr(q, "_pre_quant_scale"):
            delattr(q, "_pre_quant_scale")


@torch.no_grad()
def _search_linear(m, xs: list[Tensor]) -> None:
    """awq_lite's search-pass losses of linear ``m`` over the recorded inputs ``xs``."""
    h = m.awq_lite
    _drop_pre_quant_scales(m)  # the float output: no scales, weight not quantized
    refs = [m.output_quantizer(F.linear(x, m.weight, m.bias)) for x in xs]
    for alpha in h.loss:
        s = _awq_scale(h.act_scale, h.weight_scale, alpha)
        m.input_quantizer.pre_quant_scale = (1 / s).to(m.weight.dtype)
        m.weight_quantizer.pre_quant_scale = s.to(m.weight.dtype)
        wq = m.weight_quantizer(m.weight)
        for x, ref in zip(xs, refs):
            out = m.output_quantizer(F.linear(m.input_quantizer(x), wq, m.bias))
            loss = (out - ref).float().pow(2).mean()
            h.loss[alpha] += loss.to(h.loss[alpha].device)
        del wq, out  # before the next alpha's copy is made: one quantized weight at a time
    h.num_search_steps += len(xs)


def search_pass(runner, layer, i: int, inputs: list[Tensor]) -> list[Tensor]:
    """awq_lite's search pass over layer ``i`` (modelopt-quantized, inside ``mtq.quantize``'s
    second forward-loop call) on ``inputs``; returns the layer's outputs of that pass."""
    active = [m for m in layer.modules() if getattr(getattr(m, "awq_lite", None), "is_enabled", False)]
    seen: dict[int, list[Tensor]] = {id(m): [] for m in active}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0]))
             for m in active]
    for m in active:
        m.awq_lite.is_enabled = False  # the patched forward returns its float output at once
    try:
        outputs = runner.forward(layer, i, inputs)
    finally:
        for hk in hooks:
            hk.remove()
        for m in active:
            m.awq_lite.is_enabled = True
    for m in active:
        xs = [x for x in seen.pop(id(m)) if x.numel()]
        if xs:
            _search_linear(m, xs)
    return outputs
