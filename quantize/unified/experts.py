"""The unified checkpoint of a mixture-of-experts family (Mixtral, Qwen2-MoE, Qwen3-MoE): what
nvidia-modelopt 0.47's ``export_hf_checkpoint`` writes for the experts, read from its export of
a transformers-4.57 model (tests/test_moe_pytorch_target.py compares them tensor for tensor).

* Names: transformers 4's per-expert modules, as the source checkpoint holds them
  (``model.layers.i.block_sparse_moe.experts.e.w1`` / ``w2`` / ``w3`` for Mixtral,
  ``model.layers.i.mlp.experts.e.gate_proj`` / ``up_proj`` / ``down_proj`` for Qwen-MoE): each
  expert linear is a linear of its own with the dense format's tensors.
* Each expert's gate and up projections share their weight quantizer's amax, the element-wise
  maximum of the two (``layer_utils.sync_moe_gate_up_amax``, which ``_export_transformers_checkpoint``
  runs for every format): FP8 one per-tensor ``weight_scale`` for both, INT8 weight-only one
  per-row ``weight_scale`` [I] for both. The down projection keeps its own.
* FP8 ``input_scale``: one per projection for every expert of the layer, the maximum over the
  experts (modelopt's ``layer_sync_moe_local_experts_amax``), ``amax / 448``; transformers 5's
  fused experts, which build_engine calibrates, have exactly that one input quantizer per
  projection (quantize/moe.py).
* Experts no calibration token reached: their weight amax is the weight's absolute maximum
  (``sync_moe_expert_amax`` runs a weight-only ``max_calibrate`` for them), their input scale the
  layer's; a layer none of whose experts saw a token is refused naming it (quantize/moe.py).
* The routers (and Qwen2-MoE's ``shared_expert_gate``) stay in the source dtype, unquantized, and
  are listed in ``exclude_modules`` per layer (``get_quant_config``); the shared expert is a dense
  linear of the family, quantized as any other (its gate and up keep their own scales).
"""
from __future__ import annotations

import re

import torch

from common.errors import UserError
from model.spec import HF_LAYER

from ..modelopt_state import Lin, fuse, sanitize_amax
from ..moe import fp8_experts
from ..moe_blocks import unfused_blocks
from .tensors import ENCODE, linear_tensors

Tensor = torch.Tensor


def _module(template: str) -> str:
    return template[len(HF_LAYER):].removesuffix(".weight")


def expert_names(family) -> tuple[tuple[str, str], str]:
    """((gate, up), down) HF module templates of an expert, relative to the layer (``{e}``: the
    expert index), from the family spec (``mlp.fc`` = (up, gate), ``mlp.proj`` = (down,))."""
    up, gate = family.linear("mlp.fc").hf
    return (gate, up), family.linear("mlp.proj").hf[0]


def unquantized_modules(family, num_layers: int) -> list[str]:
    """The per-layer modules of a MoE family modelopt lists in ``exclude_modules``: its router
    and other unquantized MoE tensors (``Family.extra``: Qwen2-MoE's shared_expert_gate)."""
    return [HF_LAYER.format(i=i) + _module(rule.sources[0]) for i in range(num_layers)
            for rule in family.extra]


def expert_linear_pattern(family) -> re.Pattern:
    """The expert linears' weights by full name: group 1 the layer prefix, 2 the expert, 3 the
    module template's tail (``w1``, ``gate_proj`` ...)."""
    (gate, up), down = expert_names(family)
    head = gate.split("{e}")[0]
    tails = [t.split("{e}.")[1] for t in (gate, up, down)]
    return re.compile(r"^(model\.layers\.\d+)\." + re.escape(head) + r"(\d+)\.("
                      + "|".join(map(re.escape, tails)) + r")\.weight$")


def partner_weight(family, name: str) -> str | None:
    """The weight an expert's gate (up) projection ``name`` shares its scales with: its up (gate);
    None for any other tensor."""
    m = expert_linear_pattern(family).match(name)
    if m is None:
        return None
    (gate, up), _ = expert_names(family)
    tails = {gate.split("{e}.")[1]: up.split("{e}.")[1], up.split("{e}.")[1]: gate.split("{e}.")[1]}
    other = tails.get(m.group(3))
    return None if other is None else name[: m.start(3)] + other + ".weight"


def weight_only_pair(w: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """W8A16 of an expert's gate (or up) weight [I, H] whose per-row amax is shared with its
    partner's: (int8 weight, f32 weight_scale [I]) = max of both rows' absmax / 127."""
    amax = torch.maximum(w.abs().amax(dim=1).float(), partner.abs().amax(dim=1).float())
    scale = sanitize_amax(amax, 127.0) / 127.0
    return ENCODE["int8_rows"](w, scale), scale


@torch.no_grad()
def fp8_expert_tensors(model, family, dtype: torch.dtype) -> dict[str, Tensor]:
    """The FP8 experts of a calibrated model (transformers 5's fused experts), by unified name
    (module docstring); ``dtype``: the checkpoint's float dtype the weights are quantized from."""
    (gate, up), down = expert_names(family)
    out: dict[str, Tensor] = {}
    for i, layer in fp8_experts(model):
        pre = HF_LAYER.format(i=i)
        gate_up, down_w = layer["gate_up"], layer["down"]
        inter = gate_up.weight.shape[1] // 2
        parts = ((gate, gate_up, slice(0, inter)), (up, gate_up, slice(inter, 2 * inter)),
                 (down, down_w, slice(None)))
        for template, proj, rows in parts:
            for e in range(proj.weight.shape[0]):
                p = pre + template.format(e=e)
                scale = proj.weight_scales[e].reshape(())
                out[f"{p}.weight"] = ENCODE["fp8"](proj.weight[e, rows].to(dtype), scale)
                out[f"{p}.weight_scale"] = scale
                out[f"{p}.input_scale"] = proj.input_scale.reshape(())
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def moe_tensors(model, spec, family, dtype: torch.dtype) -> dict[str, Tensor]:
    """The experts' unified tensors of a model calibrated whole for ``spec`` (the formats whose
    recipe's ``unified.moe`` says so): FP8 from the calibrated fused experts; INT8 weight-only
    none here (streamed from the source weights, ``weight_only_pair``)."""
    fmt = spec.format.unified
    if fmt.from_float_weights:
        return {}
    if fmt.per_tensor_weight_scale:
        return fp8_expert_tensors(model, family, dtype)
    if fmt.weight == "int4":
        return awq_expert_tensors(model, family, spec, dtype)
    raise UserError(f"--target pytorch: {spec.name} experts have no unified form here")


def _block_amax(lin: Lin) -> Tensor:
    """A linear's per-block weight amax [out, in / group] as its quantizer holds it now."""
    if lin.weight_amax is not None:
        return lin.weight_amax
    return lin.wq.amax.detach().reshape(lin.weight.shape[0], -1)


@torch.no_grad()
def awq_expert_tensors(model, family, spec, dtype: torch.dtype) -> dict[str, Tensor]:
    """The INT4-AWQ experts of a model calibrated on transformers 4's per-expert block
    (quantize/moe_blocks.py), by unified name. modelopt 0.47's export
    (``requantize_resmooth_fused_llm_layers``): each projection's pre_quant_scale averaged over
    the layer's experts (``get_experts_list``: w1, w2, w3 each on its own), then each expert's
    gate and up averaged together (they read one input), each weight re-smoothed in float32 and
    its block amax re-collected; then ``sync_moe_gate_up_amax`` gives gate and up the element-wise
    maximum of their block amaxes. An expert no calibration token reached is refused (AWQ has no
    search for it), naming the layer and the experts, as on the engine target."""
    (gate, up), down = expert_names(family)
    names = {"gate": gate, "down": down, "up": up}  # get_experts_list's order (w1, w2, w3)
    blocks = unfused_blocks(model)
    if not blocks:
        raise UserError("--awq: the experts were not calibrated per expert (transformers 4 "
                        "layout); calibrate with quantize.calibrate.calibrate")
    fmt, group = spec.format.unified, spec.group_size
    out: dict[str, Tensor] = {}
    for i, block in sorted(blocks.items()):
        unrouted = [e for e, n in enumerate(block.tokens_seen) if n == 0]
        if unrouted:
            raise UserError(f"--awq: layer {i}: experts {', '.join(map(str, unrouted))} saw no "
                            f"calibration token, so AWQ cannot calibrate them; calibrate with "
                            f"more text (--calib-size) or another --calib-data")
        lins = [{k: Lin(getattr(ex, t.split("{e}.")[1])) for k, t in names.items()}
                for ex in block.experts]
        for k in names:
            fuse([g[k] for g in lins], group)
        for g in lins:
            fuse([g["gate"], g["up"]], group)
            shared = torch.maximum(_block_amax(g["gate"]), _block_amax(g["up"]))
            g["gate"].weight_amax, g["up"].weight_amax = shared, shared.clone()
        for e, g in enumerate(lins):
            for k, template in names.items():
                linear_tensors(HF_LAYER.format(i=i) + template.format(e=e), g[k], fmt, group,
                               dtype, False, out)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
