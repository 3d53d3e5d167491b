"""What the calibration store keeps for ``--target pytorch`` beside modelopt's TensorRT-LLM export.

The store's layer files hold what ``extract_quant_state`` returns (the TensorRT-LLM form: q/k/v
fused and re-smoothed, FP8 KV scales clamped to >= 1). modelopt's unified export needs what that
form loses, so a calibration whose format has a unified form adds, per layer (a few vectors per
linear, nothing of weight size):

* the smoothed formats (SmoothQuant W8A8_SQ_PER_CHANNEL, W4A16_AWQ), per linear ``P``:
  ``P.unified_pre_quant_scale`` (the input quantizer's own pre_quant_scale, before any fusion, in
  the calibration's compute dtype), ``P.unified_smoothing`` (the float32 factor modelopt multiplied
  the weight by: the smoothed weight is ``(w * it).to(w.dtype)`` of the source weight, which the
  compute-dtype scale alone does not give on a GPU) and, when the input is quantized (SmoothQuant),
  ``P.unified_input_amax`` (its own per-tensor amax, before the group maximum);
* an FP8 KV cache, per attention ``A``: ``A.unified_k_amax`` / ``A.unified_v_amax``, the raw
  running maxima (the unified ``k_scale`` / ``v_scale`` are ``amax / 448``, unclamped).

quantize/unified/from_store.py computes the unified tensors from these and the source weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from common.errors import UserError

from ..modelopt_state import model_family
from .tensors import LAYOUT

PRE_QUANT_SCALE = "unified_pre_quant_scale"
SMOOTHING = "unified_smoothing"
INPUT_AMAX = "unified_input_amax"
KV_AMAX = {"k": "unified_k_amax", "v": "unified_v_amax"}


def kept(spec) -> tuple[bool, bool]:
    """(per-linear smoothing entries, raw k/v amax entries) that ``spec``'s store keeps: only
    what a unified checkpoint of the format reads (the recipe's ``unified_store_entries``)."""
    return spec.format.unified_store_entries(spec)


@contextmanager
def smoothing_recorder(spec):
    """While modelopt calibrates (SmoothQuant, AWQ): {linear module: the float32 factor its
    weight was multiplied by} (modelopt 0.47 model_calib._apply_weight_pre_quant_scale, which
    ``apply_pre_quant_scale_and_smooth`` calls once per smoothed linear). Formats that keep no
    smoothing entries: nothing is patched."""
    seen: dict = {}
    if not kept(spec)[0]:
        yield seen
        return
    from modelopt.torch.quantization import model_calib

    original = model_calib._apply_weight_pre_quant_scale

    def recording(linear, pre_quant_scale):
        seen[linear] = pre_quant_scale.detach().to(torch.float32).reshape(-1).cpu()
        return original(linear, pre_quant_scale)

    model_calib._apply_weight_pre_quant_scale = recording
    try:
        yield seen
    finally:
        model_calib._apply_weight_pre_quant_scale = original


@torch.no_grad()
def store_entries(root, prefix: str, spec, smoothing: dict | None = None) -> dict[str, torch.Tensor]:
    """The unified entries of the calibrated layer ``prefix`` (``model.layers.5``) inside ``root``
    (its modules carrying modelopt's quantizers, or max_layerwise's records)."""
    linears, kv = kept(spec)
    out: dict[str, torch.Tensor] = {}
    if linears:
        for h in model_family(root).hf_linears():
            mod = root.get_submodule(f"{prefix}.{h}")
            iq, p = mod.input_quantizer, f"{prefix}.{h}"
            factor = (smoothing or {}).get(mod)
            pqs = getattr(iq, "_pre_quant_scale", None)
            if factor is None or pqs is None:
                raise UserError(f"{p} was not smoothed during calibration; modelopt's "
                                f"{spec.quant_algo} did not run as build_engine knows it")
            out[f"{p}.{PRE_QUANT_SCALE}"] = pqs.detach().reshape(-1).cpu()
            out[f"{p}.{SMOOTHING}"] = factor
            if iq.is_enabled and iq.amax is not None:
                out[f"{p}.{INPUT_AMAX}"] = iq.amax.detach().cpu()
    if kv:
        attn = root.get_submodule(f"{prefix}.{LAYOUT.attention[0]}")
        for x, name in KV_AMAX.items():
            q = getattr(attn, f"{x}_bmm_quantizer", None)
            if q is None or not q.is_enabled or q.amax is None:
                raise UserError(f"{prefix}: no calibrated {x}_bmm_quantizer for {spec.name}")
            out[f"{prefix}.{LAYOUT.attention[0]}.{name}"] = q.amax.detach().cpu()
    return {k: v.contiguous() for k, v in out.items()}
