"""The reference reader's kernels: the checkpoint's ``quantization`` block (``QuantSpec``) and the
dispatch of each linear / KV cache to the kernel of its format.

Quantized formats plug in as small functions: see ``LINEAR_KERNELS`` / ``register_linear`` and
``KV_CACHE_KERNELS`` / ``register_kv_cache``. The unquantized kernels live here; the quantized ones
(SmoothQuant, FP8, AWQ, weight-only INT8/INT4, INT8/FP8 KV cache) in ``verify/reference_quant.py``
and TensorRT-LLM's SmoothQuant plugin formats in ``verify/reference_sq.py``, registered when this
module is imported (at its end).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from common.errors import UserError
from model.families import FAMILIES

Tensor = torch.Tensor


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint's ``quantization`` section, as the kernels need it."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: tuple[str, ...] | None = None
    dtype: str | None = None  # the checkpoint's dtype: TensorRT-LLM casts some scales to it
    raw: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, config: dict) -> "QuantSpec":
        q = config.get("quantization") or {}
        excl = q.get("exclude_modules")
        return cls(
            quant_algo=q.get("quant_algo"),
            kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
            group_size=q.get("group_size"),
            has_zero_point=bool(q.get("has_zero_point", False)),
            pre_quant_scale=bool(q.get("pre_quant_scale", False)),
            exclude_modules=tuple(excl) if excl is not None else None,
            dtype=config.get("dtype"),
            raw=dict(q),
        )

    def algo_for(self, module: str) -> str | None:
        """quant_algo that applies to ``module`` (e.g. 'transformer.layers.0.mlp.fc'); None: unquantized.

        Like TensorRT-LLM, a module matching ``exclude_modules`` (fnmatch patterns, also tried with a
        leading '*') stays unquantized; without the list, lm_head is never quantized.
        """
        patterns = self.exclude_modules if self.exclude_modules is not None else ("*lm_head",)
        for pat in patterns:
            if fnmatch.fnmatchcase(module, pat) or fnmatch.fnmatchcase(module, "*" + pat):
                return None
        return self.quant_algo


# A linear kernel: y = x @ W^T for one module of one rank, WITHOUT bias (the caller adds it: per rank
# for column-parallel, once after the sum for row-parallel). ``params`` holds that module's tensors
# by suffix ('weight', 'weights_scaling_factor', 'prequant_scaling_factor', ...); ``x`` is in the
# compute dtype and so must be the result.
LinearKernel = Callable[[Tensor, Mapping[str, Tensor], QuantSpec], Tensor]
LINEAR_KERNELS: dict[str | None, LinearKernel] = {}

# A KV-cache kernel: (k, v, attention-module params, spec) -> (k, v) as the attention reads them back
# from the cache (e.g. quantize-dequantize with kv_cache_scaling_factor). k, v: [batch, kv_heads, seq, hd].
KVCacheKernel = Callable[[Tensor, Tensor, Mapping[str, Tensor], QuantSpec], tuple[Tensor, Tensor]]
KV_CACHE_KERNELS: dict[str | None, KVCacheKernel] = {}


def register_linear(*algos: str | None):
    """Decorator: ``@register_linear("FP8")`` adds a linear kernel for those quant_algo values."""

    def deco(fn: LinearKernel) -> LinearKernel:
        for a in algos:
            LINEAR_KERNELS[a] = fn
        return fn

    return deco


def register_kv_cache(*algos: str | None):
    """Decorator: ``@register_kv_cache("FP8")`` adds a KV-cache kernel for those kv_cache_quant_algo values."""

    def deco(fn: KVCacheKernel) -> KVCacheKernel:
        for a in algos:
            KV_CACHE_KERNELS[a] = fn
        return fn

    return deco


def require(params: Mapping[str, Tensor], key: str, what: str = "") -> Tensor:
    t = params.get(key)
    if t is None:
        raise UserError(f"tensor {what + '.' if what else ''}{key} is missing from the checkpoint")
    return t


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
    if add_bias and "bias" in params:
        y = y + params["bias"].to(y.dtype)
    return y


def names_of(table) -> str:
    return ", ".join("null" if k is None else str(k) for k in table)

from . import reference_quant  # noqa: E402,F401  (registers the quantized kernels)
from . import reference_sq  # noqa: E402,F401  (TensorRT-LLM's SmoothQuant plugin kernels)
