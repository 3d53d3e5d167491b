"""The reference reader's kernel tables: the checkpoint's ``quantization`` block (``QuantSpec``),
the linear / KV-cache kernels by format and the decorators that register them.

verify/kernels.py dispatches through these tables; the kernel modules (verify/reference_quant.py,
verify/reference_sq.py) register into them. Kept apart from the dispatch so that the kernel
modules import the tables, not the module that imports them (no import cycle).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from common.errors import UserError

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
