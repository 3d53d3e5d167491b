"""modelopt's ``max`` calibration (FP8 GEMMs, INT8/FP8 KV caches) one decoder layer at a time,
with forward hooks instead of ``mtq.quantize``.

``max`` calibration is nothing but running maxima: during its forward pass every enabled
TensorQuantizer collects ``max(|max(x)|, |min(x)|)`` of what it sees (quantization off, so the
layer computes in float) and keeps the largest over the batches. For the formats that use it
(``FP8_DEFAULT_CFG``: per-tensor input and weight quantizers on every linear; the KV entries:
per-tensor ``k_bmm_quantizer`` / ``v_bmm_quantizer`` on the key and value states the attention
interface receives, after RoPE, before the kv heads are repeated) that is what the hooks below
record, on the same tensors, in the same dtype. The records then stand where modelopt's
quantizers stand on the layer's modules, so :func:`quantize.modelopt_state.extract_quant_state`
extracts the tensors with its own arithmetic: the result is modelopt's bit for bit (the
modelopt export equality tests: FP8 + FP8 KV, INT8 KV only, bf16, Qwen2 bias, pp, kv-head
duplication), without importing modelopt (~5 s) or wrapping every module (its weight quantizers
re-read each weight on every calibration batch).

The layer's outputs of that same forward are the next layer's inputs, as in the whole model.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager

import torch

from common.errors import UserError

from .formats import FP8, QuantSpec
from .modelopt_state import NUM_BITS, extract_quant_state, sanitize_amax
from .unified.store_entries import store_entries

Tensor = torch.Tensor

_FP8_BITS = NUM_BITS[FP8]
_E2M1_BITS = (2, 1)  # modelopt's num_bits of NVFP4's E2M1 quantizers


class MaxRecord:
    """A per-tensor max calibrator's result in the shape extraction reads a modelopt
    ``TensorQuantizer`` (``amax``, ``maxbound``, ``export_amax()`` ...): the running
    ``max(|x|)`` of every tensor given to :meth:`collect`."""

    is_enabled = True
    axis = None
    pre_quant_scale = None
    _pre_quant_scale = None

    def __init__(self, num_bits, what: str):
        self.num_bits, self.what = num_bits, what
        self.amax: Tensor | None = None

    @property
    def maxbound(self) -> float:
        """TensorQuantizer.maxbound: the largest E4M3 value for FP8, E2M1's 6 for NVFP4's (2, 1),
        2^(bits-1) - 1 for ints."""
        if self.num_bits == _FP8_BITS:
            return float(torch.finfo(torch.float8_e4m3fn).max)
        if self.num_bits == _E2M1_BITS:
            return 6.0
        return float((1 << (self.num_bits - 1)) - 1)

    def collect(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        amax = torch.maximum(hi.abs(), lo.abs())  # modelopt's reduce_amax, without a copy of x
        if not torch.isfinite(amax):
            raise UserError(f"{self.what} has non-finite values during calibration; check the "
                            f"model's weights and dtype")
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)

    def export_amax(self) -> Tensor:
        """TensorQuantizer.export_amax for a per-tensor amax: sanitised, shape [1]."""
        return sanitize_amax(self.amax, self.maxbound).unsqueeze(0)


def _linears(layer, family) -> dict[str, torch.nn.Module]:
    """The layer's dense linears by the family spec's HF module names (Phi-3: the fused ones)."""
    found = {}
    for name in family.hf_linears():
        sub, n = name.rsplit(".", 1)
        parent = getattr(layer, sub, None)
        mod = getattr(parent, n, None) if parent is not None else None
        if not isinstance(mod, torch.nn.Linear):
            raise UserError(f"decoder layer has no Linear {sub}.{n}; layer-wise max "
                            f"calibration knows the layers of the {family.name} spec only")
        found[name] = mod
    return found


@contextmanager
def _input_records(linears: dict[str, torch.nn.Module], prefix: str, num_bits):
    """Every linear's input maximum (``input_quantizer``), collected by a forward pre-hook."""
    handles = []
    for name, mod in linears.items():
        rec = MaxRecord(num_bits, f"{prefix}.{name}'s input")
        mod.input_quantizer = rec
        handles.append(mod.register_forward_pre_hook(lambda _m, args, r=rec: r.collect(args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _kv_records(attn: torch.nn.Module, num_bits, prefix: str):
    """The key/value states' maxima as modelopt's ``_QuantAttention`` sees them: the attention
    interface of the layer's module (eager, or the registered one) wrapped for this forward."""
    module = inspect.getmodule(type(attn))
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    eager = impl in (None, "eager")
    if eager and not hasattr(module, "eager_attention_forward"):
        raise UserError(f"{type(attn).__name__} has no eager_attention_forward: layer-wise KV-cache "
                        f"calibration does not know this attention")
    original = module.eager_attention_forward if eager else module.ALL_ATTENTION_FUNCTIONS[impl]
    attn.k_bmm_quantizer = k = MaxRecord(num_bits, f"{prefix}.self_attn's keys")
    attn.v_bmm_quantizer = v = MaxRecord(num_bits, f"{prefix}.self_attn's values")

    def recording(mod, query, key, value, *args, **kwargs):
        if mod is attn:
            k.collect(key)
            v.collect(value)
        return original(mod, query, key, value, *args, **kwargs)

    if eager:
        module.eager_attention_forward = recording
    else:
        module.ALL_ATTENTION_FUNCTIONS[impl] = recording
    try:
        yield
    finally:
        if eager:
            module.eager_attention_forward = original
        else:
            module.ALL_ATTENTION_FUNCTIONS[impl] = original


@torch.no_grad()
def calibrate_max_layer(runner, i: int, spec: QuantSpec,
                        passes_in: list[list[Tensor]]) -> tuple[dict[str, Tensor], list[list[Tensor]]]:
    """Layer ``i``'s extracted tensors (``extract_quant_state``'s, unsharded) and its outputs
    (one pass) on ``passes_in[0]``."""
    prefix = runner.prefix(i)
    layer = runner.materialise(i)
    recipe = spec.format  # FP8 records its linears; any recipe its quantized KV cache
    linears = _linears(layer, runner.family) if recipe.max_linears else {}
    bits = recipe.linear_export.num_bits if linears else None  # FP8's (4, 3), NVFP4's (2, 1)
    kv_bits = recipe.kv_cache_bits(spec)
    with ExitStack() as stack:
        if linears:
            stack.enter_context(_input_records(linears, prefix, bits))
        if kv_bits is not None:
            stack.enter_context(_kv_records(layer.self_attn, kv_bits, prefix))
        outputs = runner.forward(layer, i, passes_in[0])
    for name, mod in linears.items():
        w = MaxRecord(bits, f"{prefix}.{name}.weight")
        w.collect(mod.weight)  # the weight quantizer sees the same weight on every batch
        mod.weight_quantizer = w
    shell = runner.named(i, layer)
    state = extract_quant_state(shell, spec, dtype=runner.dtype)
    state.update(store_entries(shell, prefix, spec))  # the raw k/v amax (--target pytorch)
    return state, [outputs]
