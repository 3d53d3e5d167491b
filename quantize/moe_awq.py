"""INT4-AWQ for a mixture-of-experts model's experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the stacked
expert tensors nvidia-modelopt 0.47's
``export_tensorrt_llm_checkpoint`` writes, from a model calibrated on transformers 4's per-expert
layout (quantize/moe_blocks.py says why and how). tests/test_moe_quant.py compares them with
modelopt's export of a transformers-4.57 calibration, bit for bit.

What the export does (``layer_utils.build_stacked_experts``), reproduced by
:func:`extract_awq_experts` without touching the modules:

* ``w2`` (down) of every expert re-smoothed to one pre-quant scale (the mean of the experts'
  scales), then ``w1``/``w3`` (gate / up) of every expert to one scale (the mean over [e0.w1,
  e0.w3, e1.w1, ...], each expert's linears in the HF module's order: gate before up); a
  re-smoothed weight's block amax is collected again (``preprocess_linear_fusion``);
* per expert, INT4 packed along the output dim as for a dense linear; ``mlp.fc`` = [w3; w1]:
  ``weight`` int8 [E, I, H] (two int4 per byte), ``weights_scaling_factor`` f32 [E, 2I, H/g],
  ``prequant_scaling_factor`` [E, H] in the checkpoint dtype (equal rows); ``mlp.proj`` = w2:
  [E, H/2, I], [E, H, I/g], [E, I].

An expert that saw no calibration token has no AWQ search (modelopt gives it a pre-quant scale of
ones, which would then be averaged into the layer's scale): refused naming the layer and experts.
"""
from __future__ import annotations

import torch

from common.errors import UserError

from .modelopt_state import Lin, enabled, fuse, quantize_weight, weight_scale
from .formats import QuantSpec
from .moe_blocks import unfused_blocks

Tensor = torch.Tensor


@torch.no_grad()
def extract_awq_experts(model, spec: QuantSpec, dtype: torch.dtype) -> dict[str, Tensor]:
    """AWQ expert tensors of a model calibrated after :func:`unfuse_experts`, unsharded, TensorRT-LLM
    names (``transformer.layers.{i}.mlp.{fc,proj}.{weight,weights_scaling_factor,
    prequant_scaling_factor}``, experts on dim 0); see the module docstring."""
    blocks = unfused_blocks(model)
    if not blocks:
        raise UserError("--awq: the experts were not calibrated per expert (transformers 4 layout); "
                        "calibrate with quantize.calibrate.calibrate")
    block_size = spec.group_size
    out: dict[str, Tensor] = {}
    for i, block in sorted(blocks.items()):
        unrouted = [e for e, n in enumerate(block.tokens_seen) if n == 0]
        if unrouted:
            raise UserError(f"--awq: layer {i}: experts {', '.join(map(str, unrouted))} saw no "
                            f"calibration token, so AWQ cannot calibrate them; calibrate with more "
                            f"text (--calib-size) or another --calib-data")
        gate, up, down = block.names  # Mixtral's w1 / w3 / w2 (quantize/moe_blocks.py)
        lins = [{k: Lin(getattr(ex, n)) for k, n in (("w1", gate), ("w2", down), ("w3", up))}
                for ex in block.experts]
        for e, group in enumerate(lins):
            for k, lin in group.items():
                if not enabled(lin.wq) or lin.wq.num_bits != 4 or not lin.pqs_enabled:
                    name = dict(zip(("w1", "w2", "w3"), (gate, down, up)))[k]
                    raise UserError(f"layer {i}: expert {e} {name} has no calibrated AWQ "
                                    f"quantizer; was the model calibrated for {spec.name}?")
        fuse([g["w2"] for g in lins], block_size)  # resmooth_only: no input amax for W4A16
        fuse([g[k] for g in lins for k in ("w1", "w3")], block_size)
        p = f"transformer.layers.{i}.mlp"
        fc = [_quantized(g["w3"], g["w1"], block_size=block_size) for g in lins]
        proj = [_quantized(g["w2"], block_size=block_size) for g in lins]
        for trt, parts, head in (("fc", fc, "w1"), ("proj", proj, "w2")):
            out[f"{p}.{trt}.weight"] = torch.stack([w for w, _ in parts]).cpu()
            out[f"{p}.{trt}.weights_scaling_factor"] = torch.stack([s for _, s in parts]).cpu()
            out[f"{p}.{trt}.prequant_scaling_factor"] = torch.stack(
                [g[head].pqs.squeeze() for g in lins]).to(dtype).cpu()
    return out


def _quantized(*lins: Lin, block_size: int) -> tuple[Tensor, Tensor]:
    """(packed int4 weight, f32 block scales) of ``lins`` stacked on the output dim."""
    scales = [weight_scale(lin, block_size) for lin in lins]
    for s in scales:
        if not torch.isfinite(s).all() or not (s > 0).all():
            raise UserError("--awq: a non-finite or zero expert weight scale; the model's expert "
                            "weights are not finite")
    weights = [quantize_weight(lin, s, "int4", block_size) for lin, s in zip(lins, scales)]
    return torch.cat(weights), torch.cat(scales)
