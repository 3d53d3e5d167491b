"""TensorRT-LLM's own SmoothQuant (the plugin formats ``W8A8_SQ_*_PLUGIN``), as its 1.2-era
``convert_checkpoint.py --smoothquant A [--per_channel] [--per_token]`` computes them
(``tensorrt_llm/models/llama/convert.py``: ``capture_activation_range``, ``smooth_llama_model``,
``generate_int8``, ``get_tllm_linear_sq_weight``; ``models/convert_utils.py``: ``smooth_gemm``,
``apply_smoothing``). The tensor table is in quantize/NOTES.md.

Three steps, each a plain function:

1. :class:`RangeHooks` on a decoder layer's linears (or :func:`capture_ranges` over a whole
   model) -> per HF linear ``{"x": max|input| per
   input channel, "y": max|output| per output channel}`` (float32), recorded by forward hooks
   exactly like TensorRT-LLM's ``capture_activation_range``. Forward hooks, not modelopt: the
   plugin formats need the *output* maxima ``y`` (static ``act_scale``, the INT8 KV scale), which
   modelopt's SmoothQuant calibration does not record, and its smoothing (one ``pre_quant_scale``
   per linear, re-averaged over q/k/v) is a different contract. The hooks record the same
   per-channel input maxima modelopt's max calibrator would.
2. :func:`smooth_layer` folds the smoothers into the norms (qkv, fc/gate) or keeps them as
   ``smoother`` (dense, proj) for one decoder layer's float weights, and ``int8_linear``
   quantizes each linear (``generate_int8``), unsharded; the per-weight arithmetic of both is in
   quantize/sq_int8.py.
3. :func:`shard_layer` cuts one layer into one TP rank's TensorRT-LLM tensors.

Builds run these one decoder layer at a time from the safetensors (quantize/sq_layerwise.py);
:func:`quantize.sq_reference.calibrate_plugin` runs them on a whole loaded model (the reference the layer-wise path is
tested against). ``--smoothquant auto``'s alpha search is in quantize/sq_search.py.

The arithmetic runs on the float32 weights (the model as calibrated on CPU; TensorRT-LLM's
script runs in the HF dtype on a GPU); smoothers in float64 as ``smooth_gemm`` computes them.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from common.errors import UserError
from model.spec import PER_BLOCK, PER_INPUT, PER_OUTPUT, QKV, companion_axis

from .formats import SQ_PLUGIN_ALGOS, QuantSpec
from .sq_int8 import Int8Linear, Lin, column_absmax, int8_linear, smoother_from_absmax
from .sq_layout import FIELDS, HF_MODULES, INPUT_SCALES, LAYOUT, SMOOTH_GROUPS

Tensor = torch.Tensor



#: plugin quant_algo -> (per-channel weights, per-token activations)
_MODES = {algo: mode for mode, algo in SQ_PLUGIN_ALGOS.items()}


def plugin_mode(quant_algo: str) -> tuple[bool, bool]:
    """(per-channel weights, per-token activations) of a plugin quant_algo."""
    try:
        return _MODES[quant_algo]
    except (KeyError, TypeError):
        raise ValueError(f"{quant_algo} is not a SmoothQuant plugin format") from None


def hf_layers(model) -> list:
    """The decoder layers of a Llama-family HF causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError("no decoder layers at model.model.layers: not a Llama-family model")
    return list(layers)


# ---------------------------------------------------------------------------------------------
# 1. Activation ranges
# ---------------------------------------------------------------------------------------------


def layer_linears(layer) -> dict[str, torch.nn.Linear]:
    """One decoder layer's seven linears by HF short name (``q_proj`` ... ``down_proj``)."""
    return {short: layer.get_submodule(h) for short, h in HF_MODULES.items()}


def _linears(model) -> dict[str, torch.nn.Linear]:
    """{'model.layers.0.self_attn.q_proj': module, ...}: the decoder's seven linears per layer."""
    out = {}
    for i, layer in enumerate(hf_layers(model)):
        for short, m in layer_linears(layer).items():
            out[f"model.layers.{i}.{HF_MODULES[short]}"] = m
    return out


class RangeHooks:
    """Forward hooks on ``linears`` ({name: module}) recording, over every call, ``x`` = max |input|
    per input channel and ``y`` = max |output| per output channel (float32, CPU), as TensorRT-LLM's
    ``capture_activation_range`` does; with ``stride`` > 0 also every ``stride``-th input row of
    each call (what the alpha search measures its error on). A context manager: the hooks go on
    exit; :meth:`ranges` then gives ``{name: {"x", "y"[, "inputs"]}}``."""

    def __init__(self, linears: Mapping[str, torch.nn.Module], stride: int = 0):
        self.linears, self.stride = linears, stride
        self._ranges: dict[str, dict[str, Tensor]] = {}
        self._handles: list = []

    def _hook(self, name, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        y = output.detach().reshape(-1, output.shape[-1])
        r = self._ranges.setdefault(name, {})
        for key, t in (("x", x), ("y", y)):
            m = t.abs().amax(dim=0).float().cpu()
            r[key] = m if key not in r else torch.maximum(r[key], m)
        if self.stride:
            r.setdefault("_rows", []).append(x[::self.stride].float().cpu())

    def __enter__(self):
        self._handles = [m.register_forward_hook(lambda mod, a, o, n=name: self._hook(n, a, o))
                         for name, m in self.linears.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self.linears = [], {}  # no reference to the modules after the capture

    def ranges(self, keep_inputs: int = 0) -> dict[str, dict[str, Tensor]]:
        for r in self._ranges.values():
            rows = r.pop("_rows", None)
            if rows is not None:
                r["inputs"] = torch.cat(rows)[:keep_inputs]
        return self._ranges


def keep_stride(tokens: int, keep_inputs: int) -> int:
    return max(1, tokens // keep_inputs) if keep_inputs else 0  # ~keep_inputs rows of tokens


@torch.no_grad()
def capture_ranges(model, batches: Iterable[Tensor], *, progress: bool = False,
                   keep_inputs: int = 0) -> dict[str, dict[str, Tensor]]:
    """Per decoder linear of the whole model, ``x`` = max |input| per input channel and ``y`` =
    max |output| per output channel over every token of ``batches`` (float32, CPU), as
    TensorRT-LLM's ``capture_activation_range`` records them (:class:`RangeHooks`).

    ``keep_inputs`` > 0: also keep up to that many input rows (tokens, evenly strided over the
    batches) per linear as ``"inputs"`` [n, in] -- what the alpha search measures its error on.
    The layer-wise calibration (quantize/sq_layerwise.py) records the same per layer.
    """
    from tqdm.auto import tqdm

    batches = list(batches)
    dev = next(model.parameters()).device
    stride = keep_stride(sum(int(b.numel()) for b in batches), keep_inputs)
    with RangeHooks(_linears(model), stride) as hooks:
        bar = tqdm(batches, desc="calibrating (activation ranges)", unit="batch",
                   disable=not progress, file=sys.stderr, leave=False)
        for batch in bar:
            model(input_ids=batch.to(dev), use_cache=False)
    return hooks.ranges(keep_inputs)


# ---------------------------------------------------------------------------------------------
# 2. Smoothing and int8 quantization of one layer (unsharded)
# ---------------------------------------------------------------------------------------------


@dataclass
class SmoothedLayer:
    qkv: Lin
    dense: Lin
    fc: Lin      # HF gate_proj
    gate: Lin    # HF up_proj
    proj: Lin
    input_norm: Tensor
    post_norm: Tensor
    dense_smoother: Tensor   # float32
    proj_smoother: Tensor    # float32
    _int8: dict | None = None

    def int8(self, mha: bool = False) -> dict[str, "Int8Linear"]:
        """:func:`int8_linear` of the five linears (computed once, shared by every rank)."""
        if self._int8 is None:
            self._int8 = {n: int8_linear(getattr(self, n), mha=mha and n == "qkv")
                          for n in FIELDS}
        return self._int8




def weight_absmax(w: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per smoother group, the column maxima of its weights (what the smoothers depend on besides
    alpha; the alpha search computes them once per layer)."""
    return {g: column_absmax([w[n] for n in names]) for g, names in SMOOTH_GROUPS.items()}


def smooth_layer(w: Mapping[str, Tensor], norms: tuple[Tensor, Tensor],
                 ranges: Mapping[str, Mapping[str, Tensor]], alpha: float, *,
                 wmax: Mapping[str, Tensor] | None = None) -> SmoothedLayer:
    """``smooth_llama_model`` for one layer. ``w``: HF short name -> float weight [out, in];
    ``norms``: (input_layernorm, post_attention_layernorm) weights; ``ranges``: short name ->
    captured ``x``/``y``; ``wmax``: :func:`weight_absmax` of ``w`` if already known. The linears
    keep references to ``w``'s weights and their smoothers: the smoothed weights are computed
    as they are quantized (quantize/sq_int8.py), never stored."""
    wmax = weight_absmax(w) if wmax is None else wmax
    s = {g: smoother_from_absmax(wmax[g], ranges[names[0]]["x"], alpha)
         for g, names in SMOOTH_GROUPS.items()}

    def lin(field: str) -> Lin:
        spec = FIELDS[field]
        group, shorts = spec.group or field, [h.rsplit(".", 1)[1] for h in spec.hf]
        parts = tuple(w[n] for n in shorts)
        if len(parts) == 1:
            return Lin(parts, ranges[shorts[0]]["x"] / s[group], ranges[shorts[0]]["y"], s=s[group])
        return Lin(parts, ranges[shorts[0]]["x"] / s[group],
                   torch.cat([ranges[n]["y"] for n in shorts]), s=s[group],
                   sections=tuple(p.shape[0] for p in parts))

    # a fusion group's smoother is folded into the norm that feeds it; the others stay tensors
    by_norm = {f.norm: s[f.group or k] for k, f in FIELDS.items() if f.norm is not None}
    folded = [(n.to(torch.float64) / by_norm[hf]).to(n.dtype)
              for n, hf in zip(norms, LAYOUT.norm_names())]
    kept = {f"{k}_smoother": s[k].float() for k, f in FIELDS.items() if f.norm is None}
    return SmoothedLayer(**{k: lin(k) for k in FIELDS}, input_norm=folded[0], post_norm=folded[1],
                         **kept)


# ---------------------------------------------------------------------------------------------
# 3. One rank's tensors
# ---------------------------------------------------------------------------------------------


def _qkv_rows(t: Tensor, sections: tuple[int, ...], tp: int, rank: int) -> Tensor:
    """[q_r; k_r; v_r] of a tensor whose dim 0 is the q|k|v output (multi_query_split)."""
    return torch.cat([torch.chunk(p, tp, dim=0)[rank] for p in t.split(list(sections))])


def _place(t: Tensor, shard: str, layout: str, tp: int, rank: int, sections=None) -> Tensor:
    """Rank ``rank``'s part of a linear's tensor of ``layout``, by the spec's companion rule
    (model.spec.companion_axis); q/k/v rows are split per q|k|v section."""
    axis = companion_axis(shard, layout)
    if axis is None:
        return t
    if shard == QKV:
        return _qkv_rows(t, sections, tp, rank)
    return torch.chunk(t, tp, dim=axis)[rank]


def _linear_tensors(prefix: str, q: Int8Linear, *, per_channel: bool, per_token: bool, shard: str,
                    tp: int, rank: int, sections=None) -> dict[str, Tensor]:
    """``get_tllm_linear_sq_weight`` for one linear: weight, per_channel_scale, act_scale."""
    w = q.w_col if per_channel else q.w_tensor
    if per_token:
        scale = q.w_quant_orig_c if per_channel else q.w_quant_orig_t
    else:
        scale = q.y_accum_quant_c if per_channel else q.y_accum_quant_t
    w = _place(w, shard, PER_BLOCK, tp, rank, sections)
    # per-tensor scales come expanded to [out]: one value, except qkv's one per q|k|v section
    if per_channel or shard == QKV:
        scale = _place(scale, shard, PER_OUTPUT, tp, rank, sections)
    else:
        scale = scale[:1]
    out = {f"{prefix}.weight": w.contiguous(),
           f"{prefix}.per_channel_scale": scale.float().reshape(1, -1).contiguous()}
    if not per_token:
        out[f"{prefix}.act_scale"] = q.y_quant_orig.reshape(1, 1).clone()
    return out


def shard_layer(layer: SmoothedLayer, quant_algo: str, *, tp: int, rank: int, prefix: str,
                norm_dtype: torch.dtype, mha: bool = False, int8_kv: bool = False) -> dict[str, Tensor]:
    """One decoder layer's plugin-SmoothQuant tensors for TP rank ``rank`` (TensorRT-LLM names under
    ``prefix``, e.g. ``transformer.layers.3``): the five linears, the smoothed norms (in
    ``norm_dtype``), ``scale_to_int``, ``quantization_scaling_factor``, ``smoother`` and, with
    ``int8_kv``, TensorRT-LLM's INT8 KV scale (max |q,k,v output| / 127)."""
    per_channel, per_token = plugin_mode(quant_algo)
    kw = dict(per_channel=per_channel, per_token=per_token, tp=tp, rank=rank)
    q = layer.int8(mha)
    out = {}
    for field, lin in FIELDS.items():
        out.update(_linear_tensors(f"{prefix}.{lin.name}", q[field], shard=lin.shard,
                                   sections=getattr(layer, field).sections, **kw))
    # the input scale of a linear fed by a norm lives on the norm (per token: ones), of the others
    # on their block (static activations only); the first linear reading it gives its value
    one = torch.ones(1, dtype=torch.float32)
    for name, field in INPUT_SCALES.items():
        if name.endswith(".scale_to_int"):
            out[f"{prefix}.{name}"] = one.clone() if per_token else q[field].x_orig_quant.reshape(1)
    for name, field in INPUT_SCALES.items():
        if not name.endswith(".scale_to_int") and not per_token:
            out[f"{prefix}.{name}"] = q[field].x_orig_quant.reshape(1)
    for field, lin in FIELDS.items():
        if lin.norm is not None:  # smoothed into the norm that feeds it; no smoother tensor
            continue
        smoother = _place(getattr(layer, f"{field}_smoother"), lin.shard, PER_INPUT, tp, rank)
        out[f"{prefix}.{lin.name}.smoother"] = smoother.reshape(1, -1).contiguous()
    out[f"{prefix}.input_layernorm.weight"] = layer.input_norm.to(norm_dtype)
    out[f"{prefix}.post_layernorm.weight"] = layer.post_norm.to(norm_dtype)
    if int8_kv:
        out[f"{prefix}.attention.kv_cache_scaling_factor"] = (layer.qkv.y.max() / 127.0).float().reshape(1)
    return out


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


def layer_weights(model, i: int) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
    """Layer ``i``'s float weights by HF short name, and its two norm weights (detached, float32)."""
    return module_weights(hf_layers(model)[i])


def module_weights(layer) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
    """A layer's float weights by HF short name and its two norms (float32, on the CPU, as the ranges)."""
    w = {n: m.weight.detach().float().cpu() for n, m in layer_linears(layer).items()}
    norms = (layer.input_layernorm.weight.detach().float().cpu(),
             layer.post_attention_layernorm.weight.detach().float().cpu())
    return w, norms


def layer_ranges(ranges: Mapping[str, Mapping[str, Tensor]], i: int) -> dict[str, Mapping[str, Tensor]]:
    return {n: ranges[f"model.layers.{i}.{h}"] for n, h in HF_MODULES.items()}


def smooth_model(model, ranges, alphas: list[float]) -> list[SmoothedLayer]:
    """Every layer smoothed with its alpha (``alphas[i]``)."""
    out = []
    for i in range(len(hf_layers(model))):
        w, norms = layer_weights(model, i)
        out.append(smooth_layer(w, norms, layer_ranges(ranges, i), alphas[i]))
    return out


def plugin_rank_tensors(layers: list[SmoothedLayer], spec: QuantSpec, *, num_heads: int,
                        num_kv_heads: int, tp: int, rank: int, norm_dtype: torch.dtype) -> dict[str, Tensor]:
    """Every layer's tensors for one TP rank (global layer numbers, ``transformer.layers.{i}``)."""
    if tp > num_kv_heads:
        raise UserError(f"--smoothquant with --tp {tp} needs at least {tp} KV heads (the model has {num_kv_heads})")
    out = {}
    for i, layer in enumerate(layers):
        out.update(plugin_layer_tensors(i, layer, spec, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                        tp=tp, rank=rank, norm_dtype=norm_dtype))
    return out


def plugin_layer_tensors(i: int, layer: SmoothedLayer, spec: QuantSpec, *, num_heads: int,
                         num_kv_heads: int, tp: int, rank: int, norm_dtype: torch.dtype) -> dict[str, Tensor]:
    """Layer ``i``'s tensors for one TP rank (``transformer.layers.{i}``)."""
    return shard_layer(layer, spec.quant_algo, tp=tp, rank=rank, prefix=f"transformer.layers.{i}",
                       norm_dtype=norm_dtype, mha=num_heads == num_kv_heads,
                       int8_kv=spec.format.kv_cache_bits(spec) == 8)  # an INT8 KV cache


def is_mha(config) -> bool:
    """As many KV heads as heads (TensorRT-LLM's multi_query_mode=False qkv branch)."""
    return getattr(config, "num_key_value_heads", None) in (None, config.num_attention_heads)


def smoothquant_val(alphas: list[float]) -> float:
    """config.json's ``smoothquant_val``: the alpha (with a per-layer search, their mean;
    informational, TensorRT-LLM does not read it when building)."""
    return round(sum(alphas) / len(alphas), 4)
