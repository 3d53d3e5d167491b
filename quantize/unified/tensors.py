"""The unified checkpoint's quantized tensors: from a whole calibrated model
(:func:`model_tensors`), or one decoder layer at a time from the calibration store
(quantize/unified/from_store.py, through :func:`layer_tensors`), with modelopt 0.47's ``export_hf_checkpoint`` arithmetic. What differs
per format is the recipe's :class:`quantize.recipes.parts.UnifiedFormat`."""
from __future__ import annotations

import torch

from common.errors import UserError
from model.families import FAMILIES

from ..modelopt_state import (Lin, act_scale, fuse, layer_prefixes, linear_modules, model_family,
                              own_export, pack_int4, sanitize_amax, weight_scale)

Tensor = torch.Tensor

#: the layout modelopt's unified export quantizes when no family is named (the Llama spec's
#: dense linears; a family's own: its spec's HF modules, Phi-3's fused qkv_proj / gate_up_proj)
LAYOUT = FAMILIES["llama"]
KV_MAXBOUND = 448.0  # modelopt: "kv cache scale as amax / 448 for both FP8 and NVFP4"
FP8_MAXBOUND = float(torch.finfo(torch.float8_e4m3fn).max)


def _int8_rows(w: Tensor, scale: Tensor, block=None) -> Tensor:
    return (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)


#: UnifiedFormat.weight -> how a weight [out, in] is encoded with its scale
ENCODE = {
    "int8_rows": _int8_rows,
    "fp8": lambda w, scale, block=None: (w / scale).to(torch.float8_e4m3fn),
    "int4": lambda w, scale, block: pack_int4(w, scale, block).view(torch.uint8),
}


def weight_only_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """W8A16 from a float weight [out, in]: (int8 weight, f32 weight_scale [out]).

    modelopt: max calibration of the weight quantizer (axis 0) → export_amax (0 → 127) / 127, then
    ``(w / scale[:, None]).round().clamp(-128, 127)``.
    """
    scale = sanitize_amax(w.abs().amax(dim=1).float(), 127.0) / 127.0
    return _int8_rows(w, scale), scale


def _norm_offset(family, norm: str) -> float:
    """The ``offset`` of the family's norm rule for HF norm ``norm`` (Gemma's (1 + w): 1)."""
    return next((r.offset for r in family.norms if r.sources[0].endswith(f".{norm}.weight")), 0.0)


def _fuse_groups(model, prefix: str, lins: dict, fmt, block, dtype, out: dict, family) -> set:
    """modelopt's preprocess_linear_fusion on the linears sharing an input (and AWQ's folding of
    their pre_quant_scale into the norm that feeds them, the family's: Gemma's MLP is fed by
    pre_feedforward_layernorm; a ``(1 + w)`` norm folds as modelopt's fuse_prequant_layernorm
    does, ``(w + 1) * s - 1``); the linears folded."""
    folded: set = set()
    if not fmt.fuse_shared_inputs:
        return folded
    for names in family.fusion_groups().values():
        if len(names) < 2:  # one (fused) HF module: modelopt fuses only several sharing an input
            continue
        norm = family.linear_of(names[0])[0].norm
        fuse([lins[n] for n in names], block)
        head = lins[names[0]]
        if fmt.fold_into_norm and head.pqs is not None:
            w = model.get_submodule(f"{prefix}.{norm}").weight.detach()
            pqs, off = head.pqs.to(w.device), _norm_offset(family, norm)
            fused = (w + off) * pqs - off if off else w * pqs
            out[f"{prefix}.{norm}.weight"] = fused.to(w.dtype).to(dtype)
            folded.update(names)
    return folded


def linear_tensors(p: str, lin, fmt, block, dtype, folded: bool, out: dict) -> None:
    w = lin.weight.to(dtype)
    if fmt.per_tensor_weight_scale:  # FP8: the weight quantizer's amax / maxbound
        amax = lin.wq.amax.detach().float()
        mb = float(lin.wq.maxbound)
        scale = torch.tensor(amax.item() / mb) if amax.dim() == 1 else amax / mb
    else:
        scale = weight_scale(lin, block)
    out[f"{p}.weight"] = ENCODE[fmt.weight](w, scale, block)
    out[f"{p}.weight_scale"] = scale
    if lin.weight2_amax is not None:  # W4A8_AWQ: the FP8 stage of a SequentialQuantizer
        mb = float(lin.wq2.maxbound)
        out[f"{p}.weight_scale_2"] = (sanitize_amax(lin.weight2_amax, mb).float() / mb).reshape(())
    a = act_scale(lin)
    if a is not None:
        out[f"{p}.input_scale"] = a.reshape(())
    if lin.pqs is not None and not folded:
        out[f"{p}.pre_quant_scale"] = lin.pqs.squeeze().to(dtype)


def layer_tensors(model, prefix: str, linears: dict, spec, dtype, out: dict,
                  family=None) -> None:
    """Decoder layer ``prefix``'s unified linear tensors into ``out``: ``linears`` by full name
    (modules with modelopt's quantizers, or quantize/unified/from_store.py's stand-ins), ``model``
    whatever gives the norms AWQ folds into (``get_submodule``); ``family``'s dense linears (a
    mixture of experts: its attention and shared expert; the experts: quantize/unified/experts.py)."""
    fmt = spec.format.unified
    family = family or model_family(model)
    lins = {h: Lin(linears[f"{prefix}.{h}"]) for h in family.hf_linears()}
    if fmt.from_float_weights:  # W8A16: scales from the (unmodified) float weights
        for s, lin in lins.items():
            p = f"{prefix}.{s}"
            out[f"{p}.weight"], out[f"{p}.weight_scale"] = weight_only_int8(lin.weight.to(dtype))
        return
    for s, lin in lins.items():
        if lin.wq is None or not lin.wq.is_enabled:
            raise UserError(f"{prefix}: {s} has no enabled weight quantizer; was the model "
                            f"calibrated for {spec.name}?")
    folded = _fuse_groups(model, prefix, lins, fmt, spec.group_size, dtype, out, family)
    for s, lin in lins.items():
        if fmt.weight not in ENCODE:  # the recipe encodes its linears itself (NVFP4)
            trtllm = own_export(spec, lin)
            for k, v in spec.format.unified_linear(trtllm, lin.weight.to(dtype)).items():
                out[f"{prefix}.{s}.{k}"] = v
            continue
        linear_tensors(f"{prefix}.{s}", lin, fmt, spec.group_size, dtype, s in folded, out)


def _kv_scales(model, layers: list[str], spec, out: dict) -> None:
    for prefix in layers:
        attn = model.get_submodule(f"{prefix}.self_attn")
        for kv in "kv":
            q = getattr(attn, f"{kv}_bmm_quantizer", None)
            if q is None or not q.is_enabled or getattr(q, "_amax", None) is None:
                raise UserError(f"{prefix}: no calibrated {kv}_bmm_quantizer; was the model "
                                f"calibrated for {spec.name}?")
            out[f"{prefix}.self_attn.{kv}_proj.{kv}_scale"] = q._amax.detach().float() / KV_MAXBOUND


@torch.no_grad()
def model_tensors(model, spec, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of a calibrated model that differ from the source checkpoint, by unified name.

    Linear weights (quantized) and their scales, AWQ's folded norms, KV-cache scales. ``dtype``:
    the checkpoint's float dtype (quantized weights are computed from the weights in it).
    """
    out: dict[str, Tensor] = {}
    layers = layer_prefixes(model)
    if not layers:
        raise UserError("no decoder layers named '*.layers.N.self_attn' found: not a Llama-family model")
    family = model_family(model)  # a mixture's experts: quantize/unified/experts.py
    if spec.format.unified.weight is not None:
        linears = linear_modules(model)
        for prefix in layers:
            layer_tensors(model, prefix, linears, spec, dtype, out, family)
    if spec.kv_cache_quant_algo is not None:
        _kv_scales(model, layers, spec, out)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
