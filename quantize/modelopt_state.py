"""What a modelopt-calibrated model gives a TensorRT-LLM checkpoint, as modelopt 0.47's
``export_tensorrt_llm_checkpoint`` writes it.

* :func:`extract_quant_state` reads the calibrated model and returns, per HF linear module
  (``model.layers.0.self_attn.q_proj``, ...) and per attention module, the UNSHARDED tensors in
  exactly the values modelopt's export writes, including its fusion pre-processing (q/k/v
  re-smoothed to one pre_quant_scale and sharing one activation scale; FP8 gate/up sharing
  scales). It does not modify the model.
* :func:`shard_quant_state` (quantize/state_shard.py, re-exported here) is the reference for
  naming and splitting them into one TP rank's TensorRT-LLM tensors
  (``transformer.layers.{i}.attention.qkv.*`` ...), as modelopt's export does.

See quantize/NOTES.md for the per-format table (tensors, how computed, how split).
"""
from __future__ import annotations

import re

import torch

from common.errors import UserError
from model.families import ARCHITECTURES, FAMILIES

from .formats import QuantSpec
from .recipes import RECIPES
from .state_shard import (HF_ATTENTION, KV_SCALES, LAYOUT, quant_state_names,  # noqa: F401
                          shard_quant_state)

Tensor = torch.Tensor

__all__ = ["extract_quant_state", "shard_quant_state", "quant_state_names", "own_export"]



# ---------------------------------------------------------------------------------------------
# Extraction: modelopt's export math, per HF module, unsharded
# ---------------------------------------------------------------------------------------------


#: modelopt's num_bits of the weight quantizer, per format it exports (the recipes' linear_export)
NUM_BITS = {algo: r.linear_export.num_bits for algo, r in RECIPES.items() if r.linear_export is not None}


def sanitize_amax(amax: Tensor, maxbound: float) -> Tensor:
    """TensorQuantizer.export_amax's clean-up: 0/NaN -> maxbound, then clamp to the dtype's range."""
    a = torch.nan_to_num(torch.where(amax == 0, torch.full_like(amax, maxbound), amax), nan=maxbound)
    fi = torch.finfo(a.dtype)
    return a.clamp(min=fi.tiny, max=fi.max)


def enabled(q) -> bool:
    return q is not None and q.is_enabled


def model_family(model):
    """The family spec of a HF model (its config's architecture; a layer-wise calibration's
    shell: the ``family_spec`` its runner gave it), the Llama layout when unknown: the dense
    linears of a MoE family include its shared expert (Qwen2-MoE), Phi-3's are fused modules."""
    given = getattr(model, "family_spec", None)
    if given is not None:
        return given
    archs = getattr(getattr(model, "config", None), "architectures", None) or [""]
    return FAMILIES.get(ARCHITECTURES.get(archs[0], ""), LAYOUT)


def linear_modules(model) -> dict[str, torch.nn.Module]:
    """{'model.layers.0.self_attn.q_proj': module, ...} for the family's dense decoder linears."""
    names = model_family(model).hf_linears()
    pat = re.compile(r"^(.*\.layers\.\d+)\.(" + "|".join(map(re.escape, names)) + ")$")
    return {n: m for n, m in model.named_modules() if pat.match(n)}


def layer_prefixes(model) -> list[str]:
    pat = re.compile(r"^(.*\.layers\.(\d+))\." + re.escape(HF_ATTENTION) + "$")
    found = []
    for n, _ in model.named_modules():
        m = pat.match(n)
        if m:
            found.append((int(m.group(2)), m.group(1)))
    return [p for _, p in sorted(found)]


class Lin:
    """One HF linear as modelopt's export sees it after preprocess_linear_fusion."""

    def __init__(self, module: torch.nn.Module):
        self.m = module
        self.weight = module.weight.detach()
        iq = getattr(module, "input_quantizer", None)
        self.iq = iq
        wq = getattr(module, "weight_quantizer", None)
        # a SequentialQuantizer (W4A8_AWQ): the INT4 block stage, then one FP8 per-tensor stage
        self.wq, self.wq2 = (wq[0], wq[-1]) if isinstance(wq, torch.nn.Sequential) else (wq, None)
        self.weight2_amax = (self.wq2.amax.detach() if enabled(self.wq2) and self.wq2.amax is not None
                             else None)
        pqs = getattr(iq, "_pre_quant_scale", None) if iq is not None else None
        self.pqs_enabled = iq is not None and iq.pre_quant_scale is not None
        self.pqs = pqs.detach() if pqs is not None else None
        self.weight_amax: Tensor | None = None  # set when re-smoothing re-collected it
        self.input_amax = iq.amax.detach() if enabled(iq) and iq.amax is not None else None
        self.fused_weight_amax: Tensor | None = None  # FP8 per-tensor: max over the fused group


def fuse(group: list[Lin], block: int | None) -> None:
    """modelopt.torch.export.quant_utils.preprocess_linear_fusion, without touching the modules."""
    head = group[0]
    if head.pqs_enabled:
        avg = torch.mean(torch.stack([g.pqs for g in group]), dim=0)
        for g in group:
            if not torch.equal(g.pqs, avg):
                # _update_pre_quant_scale: de-smooth and re-smooth in fp32, back to the weight dtype,
                # then the weight quantizer re-collects its amax from the new weight.
                dt = g.weight.dtype
                g.weight = (g.weight.to(torch.float32) * g.pqs.to(torch.float32)
                            / avg.to(torch.float32)).to(dt)
                g.pqs = avg.to(g.pqs.dtype)
                g.weight_amax = weight_absmax(g.weight, g.wq, block)
                if g.weight2_amax is not None:  # the per-tensor stage re-collected too
                    g.weight2_amax = g.weight.abs().amax()
    if head.input_amax is not None:
        amax = torch.max(torch.stack([g.input_amax for g in group]))
        for g in group:
            g.input_amax = amax
    if head.weight2_amax is not None:  # W4A8: the FP8 stage's amax, the group's largest
        amax = torch.max(torch.stack([g.weight2_amax for g in group]))
        for g in group:
            g.weight2_amax = amax
    if enabled(head.wq) and head.wq.amax is not None and head.wq.amax.numel() == 1:
        amax = torch.max(torch.stack([g.wq.amax.detach() for g in group]))
        for g in group:
            g.fused_weight_amax = amax


def weight_absmax(w: Tensor, wq, block: int | None) -> Tensor:
    """What the weight quantizer's max calibrator collects: per row (axis 0) or per block."""
    if block:
        out, inp = w.shape
        return w.reshape(out, inp // block, block).abs().amax(dim=-1)
    if wq.axis is None:
        return w.abs().amax()
    return w.abs().amax(dim=1)  # axis=0: one amax per output channel


def weight_scale(lin: Lin, block: int | None) -> Tensor:
    wq = lin.wq
    mb = float(wq.maxbound)
    if lin.fused_weight_amax is not None:  # per-tensor (FP8): group max, exported as [1]
        return sanitize_amax(lin.fused_weight_amax, mb).reshape(1).float() / mb
    if lin.weight_amax is not None:  # re-collected after re-smoothing
        return sanitize_amax(lin.weight_amax, mb).float() / mb
    return wq.export_amax().detach().float() / mb


def act_scale(lin: Lin) -> Tensor | None:
    if lin.input_amax is None:
        return None
    mb = float(lin.iq.maxbound)
    return sanitize_amax(lin.input_amax, mb).reshape(1).float() / mb


def pack_int4(weight: Tensor, scale: Tensor, block: int) -> Tensor:
    """modelopt's pack_int4_in_uint8 (+ the int8 view the TRT-LLM export applies): [out/2, in] int8.

    Two signed int4 per byte along the OUTPUT dim: low nibble = row 2k, high nibble = row 2k+1.
    """
    out, inp = weight.shape
    q = (weight / scale[:, torch.arange(inp) // block]).round().clamp(-8, 7).to(torch.int8)
    pairs = q.T.reshape(inp, out // 2, 2)
    packed = (pairs[..., 0] & 0x0F) | ((pairs[..., 1] & 0x0F) << 4)
    return packed.T.contiguous().view(torch.uint8).view(torch.int8)


def _to_fp8(w: Tensor, scale: Tensor, block: int = 1 << 19) -> Tensor:
    """``(w / scale).to(float8_e4m3fn)``, the same values; on CPU in blocks of ``block`` elements
    through one scratch buffer (no whole-weight float temporary: 2-3x faster at 8B shapes)."""
    if w.device.type != "cpu" or w.dim() != 2:
        return (w / scale).to(torch.float8_e4m3fn)
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    rows = max(1, block // max(1, w.shape[1]))
    buf = torch.empty((min(rows, w.shape[0]), w.shape[1]), dtype=torch.result_type(w, scale))
    for r in range(0, w.shape[0], rows):
        part = w[r:r + rows]
        tmp = buf[:part.shape[0]]
        torch.div(part, scale, out=tmp)
        out[r:r + rows].copy_(tmp)
    return out


#: the weight encoders, by the recipe's ``linear_export.codec``: (weight, scale, block) -> tensor
WEIGHT_CODECS = {
    "int8": lambda w, scale, block: (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8),
    "fp8": lambda w, scale, block: _to_fp8(w, scale),
    "int4": pack_int4,
}


def quantize_weight(lin: Lin, scale: Tensor, codec: str, block: int | None) -> Tensor:
    return WEIGHT_CODECS[codec](lin.weight, scale, block)


@torch.no_grad()
def extract_quant_state(model, spec: QuantSpec, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The quantized tensors of a calibrated model, per HF module, unsharded, on CPU.

    Keys (``P`` = an HF linear such as ``model.layers.0.self_attn.q_proj``; ``A`` = an attention
    module such as ``model.layers.0.self_attn``):

    * SmoothQuant: ``P.weight`` int8 [out, in] (smoothed), ``P.weights_scaling_factor`` f32 [out],
      ``P.activation_scaling_factor`` f32 [1], ``P.prequant_scaling_factor`` ``dtype`` [in]
    * FP8: ``P.weight`` float8_e4m3fn [out, in], ``P.weights_scaling_factor`` f32 [1],
      ``P.activation_scaling_factor`` f32 [1]
    * AWQ: ``P.weight`` int8 [out/2, in] (packed int4), ``P.weights_scaling_factor`` f32
      [out, in/group], ``P.prequant_scaling_factor`` ``dtype`` [in]; W4A8_AWQ adds
      ``P.weights_scaling_factor_2`` and ``P.activation_scaling_factor`` f32 [1] (FP8 stages)
    * KV cache (any format): ``A.k_cache_scaling_factor``, ``A.v_cache_scaling_factor``,
      ``A.kv_cache_scaling_factor`` f32 [1]

    q/k/v carry identical ``prequant_scaling_factor`` and ``activation_scaling_factor`` (and FP8
    ``weights_scaling_factor``); with FP8 so do gate_proj/up_proj — the fused layer takes them once.
    ``dtype``: the checkpoint dtype (modelopt casts prequant_scaling_factor to it).
    Weight-only formats have no linear tensors here (the float weights go into the checkpoint).
    """
    layers = layer_prefixes(model)
    if not layers:
        raise UserError("no decoder layers named '*.layers.N.self_attn' found: not a Llama-family model")
    out: dict[str, Tensor] = {}
    if spec.format.linear_export is not None:  # None: float, weight-only, KV cache only
        linears = linear_modules(model)
        for prefix in layers:
            out.update(_linear_state(prefix, linears, spec, dtype, model_family(model)))
    if spec.format.kv_cache_bits(spec) is not None:  # a quantized KV cache
        for prefix in layers:
            out.update(_kv_state(model, prefix, spec))
    return out


def _linear_state(prefix: str, linears: dict, spec: QuantSpec, dtype: torch.dtype,
                  family=LAYOUT) -> dict:
    """One decoder layer's quantized linears as modelopt's export writes them."""
    export, block = spec.format.linear_export, spec.group_size  # group: AWQ's, else None
    # absent MLP linears: a MoE layer's experts (quantize/moe.py)
    lins = {h: Lin(linears[f"{prefix}.{h}"]) for h in family.hf_linears()
            if f"{prefix}.{h}" in linears or h.startswith(HF_ATTENTION + ".")}
    for h, lin in lins.items():
        if not enabled(lin.wq) or lin.wq.num_bits != export.num_bits:
            raise UserError(f"{prefix}: {h.split('.')[-1]} has no enabled {spec.quant_algo} weight "
                            f"quantizer; was the model calibrated for {spec.name}?")
    # build_qkv: q/k/v always fused; build_mlp_config: gate/up fused only for FP8 (NVFP4); the
    # sources of one TensorRT-LLM linear always (a shared expert's fc: preprocess_linear_fusion)
    single = {lin.group for lin in family.dense_linears() if len(lin.hf) > 1}
    for group, members in family.fusion_groups().items():
        if (group in export.fused or group in single) and all(h in lins for h in members):
            fuse([lins[h] for h in members], block)
    out = {}
    for h, lin in lins.items():
        p = f"{prefix}.{h}"
        if export.codec not in WEIGHT_CODECS:  # the recipe encodes its linears itself (NVFP4)
            out.update({f"{p}.{k}": v.cpu() for k, v in own_export(spec, lin).items()})
            continue
        wsf = weight_scale(lin, block)
        out[f"{p}.weight"] = quantize_weight(lin, wsf, export.codec, block).cpu()
        out[f"{p}.weights_scaling_factor"] = wsf.cpu()
        if lin.weight2_amax is not None:  # W4A8_AWQ's per-tensor FP8 stage
            mb = float(lin.wq2.maxbound)
            out[f"{p}.weights_scaling_factor_2"] = (sanitize_amax(lin.weight2_amax, mb).reshape(1).float()
                                                    / mb).cpu()
        a = act_scale(lin)
        if a is not None:
            out[f"{p}.activation_scaling_factor"] = a.cpu()
        if lin.pqs is not None:
            out[f"{p}.prequant_scaling_factor"] = lin.pqs.squeeze().to(dtype).cpu()
    return out


def own_export(spec: QuantSpec, lin: Lin) -> dict[str, Tensor]:
    """``Recipe.export_linear`` of one linear: its weight, its (fused) weight amax as modelopt
    reads it (``_amax``, unsanitised) and its (fused) input amax as ``export_amax`` gives it."""
    weight_amax = lin.fused_weight_amax if lin.fused_weight_amax is not None else lin.wq.amax
    input_amax = None
    if lin.input_amax is not None:
        input_amax = sanitize_amax(lin.input_amax, float(lin.iq.maxbound))
    return spec.format.export_linear(lin.weight, weight_amax.detach(), input_amax)


def _kv_state(model, prefix: str, spec: QuantSpec) -> dict:
    """One decoder layer's KV-cache scales (k, v and their maximum) as modelopt exports them."""
    floor = spec.format.kv_scale_floor(spec)
    attn = model.get_submodule(f"{prefix}.{HF_ATTENTION}")
    kq, vq = getattr(attn, "k_bmm_quantizer", None), getattr(attn, "v_bmm_quantizer", None)
    if not (enabled(kq) and enabled(vq)) or kq.amax is None or vq.amax is None:
        raise UserError(f"{prefix}.{HF_ATTENTION} has no calibrated KV-cache quantizers; was the "
                        f"model calibrated for {spec.name}?")
    scales = []
    for q in (kq, vq):
        s = q.export_amax().detach().float() / float(q.maxbound)
        if floor is not None:  # modelopt clamps FP8 KV scales to >= 1
            s = torch.max(s, torch.tensor([floor], dtype=torch.float, device=s.device))
        scales.append(s.reshape(1).cpu())
    k, v = scales
    names = (f"{prefix}.{HF_ATTENTION}.{n}" for n in KV_SCALES)
    return dict(zip(names, (k, v, torch.maximum(v, k))))
