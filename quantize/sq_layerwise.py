"""TensorRT-LLM's plugin SmoothQuant calibrated one decoder layer at a time from the safetensors.

For each layer :func:`calibrate_plugin_layer` (called by ``quantize.layerwise.calibrate_layerwise``
with a :class:`quantize.layerwise.LayerRunner`) materialises only that layer, runs the cached
calibration inputs through it with the range hooks on its seven linears (the same hooks, on the
same inputs, as the whole-model capture: :class:`quantize.smoothquant.RangeHooks`), chooses alpha
(given, or searched for this layer), smooths it and computes its int8 tensors, unsharded. Those go
to the calibration store (quantize/store.py) as this layer's file; the layer's outputs of that
same forward are the next layer's inputs, exactly as in the whole model's forward. The result is
:func:`quantize.sq_reference.calibrate_plugin`'s bit for bit (tests/test_sq_plugin_layerwise.py).

A stored layer holds the int8 weight of the recipe's weight mode only (per channel or per tensor;
the recipe is in the store's fingerprint), every scale, the smoothed norms, the dense/proj
smoothers, qkv's output maximum (the INT8 KV scale), the alpha and, with ``--smoothquant auto``,
its search error. :func:`stored_layer` turns it back into a ``SmoothedLayer`` that
``shard_layer`` (and the converter's head padding) take as they take a whole-model one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from . import store as cstore
from .formats import QuantSpec
from .smoothquant import (RangeHooks, SmoothedLayer, is_mha, keep_stride, layer_linears,
                          module_weights, plugin_mode, smooth_layer, weight_absmax)
from .sq_int8 import Int8Linear, Lin, int8_linear
from .sq_layout import FIELDS
from .sq_search import ALPHA_GRID, SEARCH_TOKENS, search_layer_alpha

Tensor = torch.Tensor

LINEARS = tuple(FIELDS)  # SmoothedLayer's linears: "qkv", "dense", "fc", "gate", "proj"
_SCALES = ("w_quant_orig_c", "w_quant_orig_t", "y_accum_quant_c", "y_accum_quant_t",
           "x_orig_quant", "y_quant_orig")


def calibrate_plugin_layer(runner, i: int, spec: QuantSpec,
                           passes_in: list[list[Tensor]]) -> tuple[dict[str, Tensor], list[list[Tensor]]]:
    """Layer ``i``'s store tensors and its outputs (one pass) on ``passes_in[0]``."""
    layer = runner.materialise(i)
    inputs = passes_in[0]
    keep = SEARCH_TOKENS if spec.sq_alpha_search else 0
    tokens = sum(int(h[..., 0].numel()) for h in inputs)
    with RangeHooks(layer_linears(layer), keep_stride(tokens, keep)) as hooks:
        outputs = runner.forward(layer, i, inputs)
    ranges = hooks.ranges(keep)
    w, norms = module_weights(layer)
    del layer, hooks  # the weights live on in ``w`` only: quantizing frees them one by one
    mha = is_mha(runner.config)
    error = None
    wmax = weight_absmax(w)
    if spec.sq_alpha_search:
        alpha, error = search_layer_alpha(w, norms, ranges, spec.quant_algo, mha=mha, wmax=wmax)
    else:
        alpha = spec.smoothquant_alpha
    smoothed = smooth_layer(w, norms, ranges, alpha, wmax=wmax)
    del w
    return layer_tensors(smoothed, spec.quant_algo, mha, alpha, error), [outputs]


def layer_tensors(layer: SmoothedLayer, quant_algo: str, mha: bool, alpha: float,
                  error: float | None) -> dict[str, Tensor]:
    """What the store keeps of one smoothed layer (see the module docstring); drops the layer's
    references to its float weights as their int8 form is made (the same values as
    ``layer.int8(mha)``), so a caller holding no other reference frees them one by one."""
    per_channel, _ = plugin_mode(quant_algo)
    mode = "col" if per_channel else "tensor"
    out = {}
    for name in LINEARS:
        lin = getattr(layer, name)
        q = int8_linear(lin, mha and name == "qkv", only=mode)
        lin.parts = None  # the layer's last reference to this float weight
        out[f"{name}.weight"] = q.w_col if per_channel else q.w_tensor
        out.update({f"{name}.{f}": getattr(q, f) for f in _SCALES})
    out.update(input_norm=layer.input_norm, post_norm=layer.post_norm,
               dense_smoother=layer.dense_smoother, proj_smoother=layer.proj_smoother,
               qkv_y_max=layer.qkv.y.max(), qkv_sections=torch.tensor(layer.qkv.sections),
               alpha=torch.tensor(alpha, dtype=torch.float64))
    if error is not None:
        out["search_error"] = torch.tensor(error, dtype=torch.float64)
    return out


def stored_layer(t: dict[str, Tensor], quant_algo: str) -> SmoothedLayer:
    """A layer's store tensors as the ``SmoothedLayer`` that ``shard_layer`` shards (int8 form
    only; the weight mode the recipe does not use is None)."""
    per_channel, _ = plugin_mode(quant_algo)
    int8 = {}
    for name in LINEARS:
        w = t[f"{name}.weight"]
        int8[name] = Int8Linear(w_col=w if per_channel else None, w_tensor=None if per_channel else w,
                                **{f: t[f"{name}.{f}"] for f in _SCALES})
    none = Lin(None, None, None)
    sections = tuple(int(s) for s in t["qkv_sections"])
    return SmoothedLayer(qkv=Lin(None, None, t["qkv_y_max"].reshape(1), sections), dense=none,
                         fc=none, gate=none, proj=none, input_norm=t["input_norm"],
                         post_norm=t["post_norm"], dense_smoother=t["dense_smoother"],
                         proj_smoother=t["proj_smoother"], _int8=int8)


def stored_alphas(store: Path, num_layers: int) -> tuple[list[float], dict | None]:
    """(alpha per layer, the search report ``{"grid", "per_layer_error"}`` or None) of a complete
    plugin calibration store, as :class:`quantize.sq_reference.PluginCalibration` carries them."""
    alphas, errors = [], []
    for i in range(num_layers):
        with safe_open(str(cstore.layer_path(Path(store), i)), framework="pt") as f:
            alphas.append(float(f.get_tensor("alpha")))
            if "search_error" in f.keys():
                errors.append(float(f.get_tensor("search_error")))
    if not errors:
        return alphas, None
    return alphas, {"grid": list(ALPHA_GRID), "per_layer_error": errors}

