"""``--smoothquant auto``: TensorRT-LLM's plugin SmoothQuant with alpha chosen per decoder layer,
the grid value whose simulated int8 GEMM outputs are closest to the float outputs on calibration
input rows kept by the range capture (quantize/smoothquant.py ``RangeHooks``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .smoothquant import (SmoothedLayer, hf_layers, layer_ranges, layer_weights, plugin_mode,
                          smooth_layer, weight_absmax)
from .sq_int8 import Int8Linear, Lin, int8_linear
from .sq_layout import FIELDS, GROUP_FIELDS, SMOOTH_GROUPS

Tensor = torch.Tensor

#: alpha candidates of ``--smoothquant auto``
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: calibration input rows kept per linear for ``--smoothquant auto``
SEARCH_TOKENS = 1024


def fake_quant_output(x: Tensor, lin: Lin, q: Int8Linear, *, per_channel: bool, per_token: bool) -> Tensor:
    """What the plugin GEMM returns for the smoothed input rows ``x`` [n, in] (already divided by the
    smoother), simulated in float32: int8 activations (per token: 127 / row max; static:
    ``x_orig_quant``) times the int8 weight and its scales."""
    if per_token:
        amax = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)
        xq = torch.round(x * (127.0 / amax)).clamp(-128, 127) * (amax / 127.0)
    else:
        sc = q.x_orig_quant
        xq = torch.round(x * sc).clamp(-128, 127) / sc
    w = (q.w_col.float() * q.w_quant_orig_c[:, None] if per_channel
         else q.w_tensor.float() * q.w_quant_orig_t[:, None])
    return xq @ w.t()


def layer_error(layer: SmoothedLayer, inputs: Mapping[str, Tensor], ref: Mapping[str, Tensor],
                quant_algo: str, mha: bool = False) -> float:
    """Sum over qkv, dense, fc+gate, proj of ||quantized output - float output||^2 / ||float output||^2
    on the kept calibration inputs (float, unsmoothed; ``ref``: their float outputs)."""
    per_channel, per_token = plugin_mode(quant_algo)
    total = 0.0
    for group, members in GROUP_FIELDS.items():
        x = (inputs[group].double() / getattr(layer, members[0]).s).float()
        err = norm = 0.0
        for name in members:
            lin = getattr(layer, name)
            q = int8_linear(lin, mha and name == "qkv", only="col" if per_channel else "tensor")
            got = fake_quant_output(x, lin, q,
                                    per_channel=per_channel, per_token=per_token)
            err += float((got - ref[name]).pow(2).sum())
            norm += float(ref[name].pow(2).sum())
        total += err / max(norm, 1e-30)
    return total


def search_alphas(model, ranges, quant_algo: str, grid=ALPHA_GRID, mha: bool = False) -> tuple[list[float], dict]:
    """Per layer, the alpha of ``grid`` with the smallest :func:`layer_error` on the inputs kept by
    ``capture_ranges(..., keep_inputs=N)``. Returns (alphas, {"per_layer_error": ..., "grid": ...})."""
    alphas, errors = [], []
    for i in range(len(hf_layers(model))):
        w, norms = layer_weights(model, i)
        a, e = search_layer_alpha(w, norms, layer_ranges(ranges, i), quant_algo, grid, mha)
        alphas.append(a)
        errors.append(e)
    return alphas, {"grid": list(grid), "per_layer_error": errors}


def search_layer_alpha(w: Mapping[str, Tensor], norms: tuple[Tensor, Tensor],
                       r: Mapping[str, Mapping[str, Tensor]], quant_algo: str, grid=ALPHA_GRID,
                       mha: bool = False, wmax: Mapping[str, Tensor] | None = None) -> tuple[float, float]:
    """One layer's (alpha, error): the first alpha of ``grid`` with the smallest :func:`layer_error`
    (``r``: its ranges by HF short name, with the kept ``inputs``; ``wmax``: ``weight_absmax(w)``
    if already known)."""
    if "inputs" not in r["q_proj"]:
        raise ValueError("search_layer_alpha needs ranges captured with keep_inputs=N")
    inputs = {g: r[names[0]]["inputs"] for g, names in SMOOTH_GROUPS.items()}
    ref = {}
    for group, fields in GROUP_FIELDS.items():
        for f in fields:
            shorts = [h.rsplit(".", 1)[1] for h in FIELDS[f].hf]
            ref[f] = inputs[group] @ (torch.cat([w[n] for n in shorts]) if len(shorts) > 1
                                      else w[shorts[0]]).t()
    best = None
    wmax = weight_absmax(w) if wmax is None else wmax
    for a in grid:
        e = layer_error(smooth_layer(w, norms, r, a, wmax=wmax), inputs, ref, quant_algo, mha)
        if best is None or e < best[1]:
            best = (a, e)
    return best
