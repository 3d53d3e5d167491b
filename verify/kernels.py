"""The reference reader's kernels: the checkpoint's ``quantization`` block (``QuantSpec``) and the
dispatch of each linear / KV cache to the kernel of its format.

Quantized formats plug in as small functions: see ``LINEAR_KERNELS`` / ``register_linear`` and
``KV_CACHE_KERNELS`` / ``register_kv_cache`` (verify/kernel_table.py). The unquantized kernels live here; the quantized ones
(SmoothQuant, FP8, AWQ, weight-only INT8/INT4, INT8/FP8 KV cache) in ``verify/reference_quant.py``
and TensorRT-LLM's SmoothQuant plugin formats in ``verify/reference_sq.py``, registered when this
module is imported (at its end).
"""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import UserError
from model.families import FAMILIES

from .kernel_table import (KV_CACHE_KERNELS, LINEAR_KERNELS, QuantSpec,  # noqa: F401 (re-exported)
                           register_kv_cache, register_linear, require)

Tensor = torch.Tensor


@register_linear(None)
def _linear_unquantized(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    w = require(params, "weight")
    if not w.is_floating_point():
        raise UserError(f"unquantized checkpoint holds a {w.dtype} weight; quantization.quant_algo is null "
                        "but the weights look quantized")
    return x @ w.to(x.dtype).t()


@register_kv_cache(None)
def _kv_cache_plain(k: Tensor, v: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec):
    return k, v


# Tensors outside a linear's own module that its kernel reads, by linear (under the layer prefix):
# TensorRT-LLM's SmoothQuant plugin formats quantize a linear's input with the preceding norm's
# ``scale_to_int`` or the block's ``quantization_scaling_factor``; passed to the kernel as
# ``input_scale`` when the checkpoint has them.
_LAYOUT = FAMILIES["llama"]
# From the Llama spec: the norm that feeds a linear, else its block ("attention", "mlp").
LINEAR_INPUT_SCALES = {
    lin.name: (f"{_LAYOUT.input_norm(lin)}.scale_to_int" if lin.norm is not None
               else f"{lin.name.split('.')[0]}.quantization_scaling_factor")
    for lin in _LAYOUT.dense_linears()}


def linear(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec, module: str = "",
           add_bias: bool = True) -> Tensor:
    """One rank's linear layer: dispatch on the quant_algo that applies to ``module``."""
    algo = qcfg.algo_for(module)
    kernel = LINEAR_KERNELS.get(algo)
    if kernel is None:
        raise UserError(f"quant_algo {algo} is not supported by the reference reader yet "
                        f"(supported: {names_of(LINEAR_KERNELS)})")
    try:
        y = kernel(x, params, qcfg)
    except UserError as e:
        raise UserError(f"{module}: {e}") from None
    if "lora" in params:  # verify/lora_reader.py: the LoRA plugin's x A^T B^T per module
        y = y + torch.cat([(x @ a.T.to(x.dtype)) @ b.T.to(x.dtype) if a is not None else
                           x.new_zeros(*x.shape[:-1], b) for a, b in params["lora"]], -1).to(y.dtype)
    if add_bias and "bias" in params:
        y = y + params["bias"].to(y.dtype)
    return y


def names_of(table) -> str:
    return ", ".join("null" if k is None else str(k) for k in table)

from . import reference_quant  # noqa: E402,F401  (registers the quantized kernels)
from . import reference_sq  # noqa: E402,F401  (TensorRT-LLM's SmoothQuant plugin kernels)
from . import reference_fp8_rowwise  # noqa: E402,F401  (FP8_PER_CHANNEL_PER_TOKEN)
from . import reference_nvfp4  # noqa: E402,F401  (NVFP4)
from . import reference_w4a8  # noqa: E402,F401  (W4A8_AWQ)
