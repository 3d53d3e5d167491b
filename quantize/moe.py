"""Quantized mixture-of-experts layers (Mixtral, Qwen-MoE): which formats, and the calibrated
expert tensors.

What nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint`` writes for a calibrated Mixtral
(``modelopt/torch/export/layer_utils.py``: ``build_stacked_experts``, ``_build_stacked_linear``),
read from its export of a transformers-4 model (tests/test_moe_quant.py compares them):

* FP8: ``mlp.fc.weight`` float8 [E, 2I, H] = per expert [w3; w1] quantized with ONE per-expert
  scale, the max of w1's and w3's (modelopt pre-fuses each expert's w1/w3:
  ``preprocess_linear_fusion``); ``mlp.fc.weights_scaling_factor`` f32 [E, 1]; ``mlp.proj.*`` the
  same for w2; ``activation_scaling_factor`` f32 [1] per module, the max over the experts ("the moe
  plugin only supports a single activation scaling factor for all experts"). The router stays
  float32 and is listed in ``exclude_modules``.
* W8A16 / W4A16 (weight-only): the float experts and the quant_algo; trtllm-build quantizes the
  3-D expert weights itself (``weight_only_quantize`` transposes the last two dims for dim > 2).
* W4A16_AWQ: ``mlp.fc`` / ``mlp.proj`` packed int4 per expert, group scales and pre-quant scales
  stacked on dim 0 (quantize/moe_awq.py); the routers listed in ``exclude_modules`` as for FP8.
* NVFP4: per expert as a dense NVFP4 linear (``export_linear``): ``mlp.fc.weight`` uint8
  [E, 2I, H/2] = [w3; w1] packed E2M1 under ONE per-expert global (w1/w3 pre-fused: the max of
  their amaxes), ``weights_scaling_factor`` E4M3 [E, 2I, H/16], ``weights_scaling_factor_2`` f32
  [E]; ``activation_scaling_factor`` f32 [1] per module, the max over the experts; ``mlp.proj``
  alike for w2. TensorRT-LLM 1.2's ``MOEWeightWrapper`` (layers/moe.py) declares the block scales
  and their interleaved copy [E, out, in/16], ``activation_global_scaling_factor`` [1] and
  ``alpha`` [E] (preprocess_weights: activation global x each expert's weight global).
* INT8 / FP8 KV cache: attention only, as for dense models.

Calibration runs on transformers 5, where modelopt wraps the fused ``MixtralExperts``
(``_QuantFusedExperts``): one weight quantizer per expert for ``gate_up_proj`` ([w1; w3]) and
``down_proj``, one input quantizer per projection shared by all experts. Their values are those of
the transformers-4 export: an expert's fused weight amax is max(w1 amax, w3 amax), and the shared
input amax is the max over every (token, expert) pair that was routed, which is the max over the
experts of the per-expert amaxes. Every expert gets a weight scale whether or not calibration
routed a token to it: a max-calibrated weight amax is the weight's own absolute max (the value
used where the quantizer holds none); an activation scale is per layer, and a layer whose experts
saw no token at all is refused naming it.

INT4-AWQ: calibrated on transformers 4's per-expert block (quantize/moe_blocks.py: modelopt 0.47's
AWQ search does not visit transformers 5's fused experts), tensors in quantize/moe_awq.py; every
expert input per rank must hold whole AWQ groups.

Refused for MoE (one line, before any work): SmoothQuant (modelopt 0.47's export fails on
Mixtral's stacked experts, and TensorRT-LLM's MoE plugin has no INT8 SmoothQuant GEMM).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.errors import UserError

from .formats import QuantSpec
from .modelopt_state import sanitize_amax
from .moe_awq import extract_awq_experts

if TYPE_CHECKING:  # the converter's expert layout; only its attributes are read here
    from convert.moe import MoeLayout

Tensor = torch.Tensor
FP8_MAX = 448.0


def preflight_moe_quant(spec: QuantSpec | None, shape, layout: MoeLayout) -> None:
    """Refuse, before any work, a format this converter does not write for experts, or expert
    GEMM shapes TensorRT-LLM's weight-only kernels cannot take (the recipe's ``moe.preflight``,
    quantize/recipes/moe)."""
    if not getattr(shape, "experts", 0) or spec is None:
        return
    spec.format.moe.preflight(spec, shape, layout)


def moe_exclude_modules(spec: QuantSpec, shape) -> list[str] | None:
    """config.json's ``exclude_modules`` for a MoE model: modelopt lists each layer's router with
    lm_head for its calibrated formats (a set there: compare without order); the weight-only
    formats keep TensorRT-LLM's defaults, which hold ``*router`` (the recipe's
    ``moe.exclude_modules``)."""
    return spec.format.moe.exclude_modules(spec, shape)


def _experts_modules(model) -> dict[int, torch.nn.Module]:
    pat = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp\.experts$")
    return {int(m.group(1)): mod for n, mod in model.named_modules() if (m := pat.match(n))}


def _amax(q) -> Tensor | None:
    a = getattr(q, "amax", None) if q is not None and q.is_enabled else None
    if a is None or not torch.isfinite(a).all() or bool((a == 0).all()):
        return None
    return a.detach().float().reshape(())


def _weight_scales(weights: Tensor, quantizers) -> Tensor:
    """[E, 1] per-expert FP8 scales: the quantizer's amax, or the weight's abs max where the
    expert saw no calibration token (what max calibration of that weight gives)."""
    out = []
    for e in range(weights.shape[0]):
        a = _amax(quantizers[e]) if quantizers is not None else None
        if a is None:
            a = weights[e].detach().abs().amax().float()
        out.append(a.clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX)
    return torch.stack(out).reshape(-1, 1)


@torch.no_grad()
def extract_moe_state(model, spec: QuantSpec, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """Expert tensors of a calibrated Mixtral, unsharded, TensorRT-LLM layout, every expert on dim
    0: FP8 (transformers 5's fused experts) ``transformer.layers.{i}.mlp.{fc,proj}.{weight,
    weights_scaling_factor,activation_scaling_factor}`` (see the module docstring); AWQ
    (per-expert calibration) quantize/moe_awq.py, ``dtype`` the checkpoint's (pre-quant scales)."""
    extract = _EXTRACTORS.get(spec.format.moe.experts)
    return {} if extract is None else extract(model, spec, dtype)


@dataclass(frozen=True)
class Fp8Projection:
    """One projection of a layer's calibrated fused experts: ``weight`` [E, out, in] as
    transformers 5 holds it (gate_up = [gate; up]), ``weight_scales`` [E, 1] (max over the
    projection, as modelopt's gate/up fusion gives), ``input_scale`` [1] shared by the experts."""

    weight: Tensor
    weight_scales: Tensor
    input_scale: Tensor


def fp8_experts(model):
    """(layer, {"gate_up": Fp8Projection, "down": Fp8Projection}) of a model calibrated for FP8
    on transformers 5's fused experts, layer by layer (see the module docstring)."""
    experts = _experts_modules(model)
    if not experts:
        raise UserError("no '*.layers.N.mlp.experts' modules found: not a Mixtral model")
    for i, mod in sorted(experts.items()):
        gate_up = getattr(mod, "gate_up_proj", None)
        if not isinstance(gate_up, Tensor) or gate_up.dim() != 3:
            raise UserError(f"layer {i}: experts are not transformers 5's fused MixtralExperts")
        layer = {}
        for stem, weight in (("gate_up", gate_up), ("down", mod.down_proj)):
            act = _amax(getattr(mod, f"{stem}_proj_input_quantizer", None))
            if act is None:
                raise UserError(f"layer {i}: no calibration token reached its experts "
                                f"({stem}_proj has no activation amax); calibrate with more text "
                                f"(--calib-size) or another --calib-data")
            wsf = _weight_scales(weight, getattr(mod, f"{stem}_proj_weight_quantizers", None))
            layer[stem] = Fp8Projection(weight, wsf, (act / FP8_MAX).reshape(1))
        yield i, layer


def _extract_fp8_experts(model, spec: QuantSpec, dtype: torch.dtype) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i, layer in fp8_experts(model):
        gate_up = layer["gate_up"]
        inter = gate_up.weight.shape[1] // 2
        w1, w3 = gate_up.weight[:, :inter], gate_up.weight[:, inter:]
        for trt, weight, proj in (("mlp.fc", torch.cat([w3, w1], dim=1), gate_up),
                                  ("mlp.proj", layer["down"].weight, layer["down"])):
            p = f"transformer.layers.{i}.{trt}"
            wsf = proj.weight_scales
            out[f"{p}.weight"] = (weight / wsf[:, :, None]).to(torch.float8_e4m3fn).cpu()
            out[f"{p}.weights_scaling_factor"] = wsf.cpu()
            out[f"{p}.activation_scaling_factor"] = proj.input_scale.cpu()
    return out


def _extract_linear_experts(model, spec: QuantSpec, dtype: torch.dtype) -> dict[str, Tensor]:
    """Experts exported one by one with the recipe's ``export_linear`` (NVFP4), stacked on dim 0
    (a 0-dim per-linear global becomes [E]), as modelopt 0.47's ``_build_stacked_linear`` stacks
    a transformers-4 model's per-expert tensors; each expert's weight amax is its quantizer's
    (w1/w3 fused: their max, modelopt's ``preprocess_linear_fusion``), or its weight's abs max
    where calibration routed it no token; the activation global is one [1] per module from the
    shared input amax (the max over the experts, as that export takes it)."""
    out: dict[str, Tensor] = {}
    for i, mod in sorted(_experts_modules(model).items()):
        gate_up = getattr(mod, "gate_up_proj", None)
        if not isinstance(gate_up, Tensor) or gate_up.dim() != 3:
            raise UserError(f"layer {i}: experts are not transformers 5's fused experts")
        inter = gate_up.shape[1] // 2
        for trt, weight, stem in (("mlp.fc", torch.cat([gate_up[:, inter:], gate_up[:, :inter]],
                                                       dim=1), "gate_up_proj"),
                                  ("mlp.proj", mod.down_proj, "down_proj")):
            iq = getattr(mod, f"{stem}_input_quantizer", None)
            if _amax(iq) is None:
                raise UserError(f"layer {i}: no calibration token reached its experts "
                                f"({stem} has no activation amax); calibrate with more text "
                                f"(--calib-size) or another --calib-data")
            act = sanitize_amax(iq.amax.detach().float(), float(iq.maxbound))
            wqs = getattr(mod, f"{stem}_weight_quantizers", None)
            parts = []
            for e in range(weight.shape[0]):
                amax = _amax(wqs[e]) if wqs is not None else None
                parts.append(spec.format.export_linear(
                    weight[e].detach().float(),
                    weight[e].detach().abs().amax().float() if amax is None else amax, act))
            p = f"transformer.layers.{i}.{trt}"
            for key in parts[0]:
                if key == "activation_scaling_factor":
                    out[f"{p}.{key}"] = parts[0][key].reshape(1).cpu()
                else:
                    out[f"{p}.{key}"] = torch.stack([t[key] for t in parts]).cpu()
    return out


#: the recipes' ``moe.experts`` -> the extractor of their expert tensors
_EXTRACTORS = {"fp8": _extract_fp8_experts, "awq": extract_awq_experts,
               "linear": _extract_linear_experts}


def shard_moe_state(state: dict[str, Tensor], layout: MoeLayout, tp_rank: int,
                    num_experts: int) -> dict[str, Tensor]:
    """Rank ``tp_rank``'s expert tensors: its expert block; fc rows [w3; w1] (weight, AWQ group
    scales) and proj input columns (weight, AWQ group scales, pre-quant scale) cut to its moe_tp
    slice (fc per expert, each half separately); per-tensor scales and fc's pre-quant scale
    (its input is the hidden state) as they are."""
    moe_tp_rank, _ = layout.ranks(tp_rank)
    block = layout.experts(num_experts, tp_rank)
    out = {}
    for name, t in state.items():
        if not name.endswith("activation_scaling_factor"):  # per expert (activation scales:
            t = t[block.start:block.stop]                    # one [1] per module)
        if t.dim() == 3 and ".fc." in name:
            up, gate = t.chunk(2, dim=1)
            t = torch.cat([up.chunk(layout.moe_tp, dim=1)[moe_tp_rank],
                           gate.chunk(layout.moe_tp, dim=1)[moe_tp_rank]], dim=1)
        elif t.dim() == 3:  # proj: [E, H, I] (and [E, H, I/g]) split on I
            t = t.chunk(layout.moe_tp, dim=2)[moe_tp_rank]
        elif name.endswith("proj.prequant_scaling_factor"):  # [E, I]
            t = t.chunk(layout.moe_tp, dim=1)[moe_tp_rank]
        out[name] = t.contiguous()
    return out
