"""The unified checkpoint's quantized tensors one decoder layer at a time, from the calibration
store (quantize/store.py) and the source weights, equal to modelopt 0.47's ``export_hf_checkpoint``
of the whole model calibrated in memory (tests/test_pytorch_target.py).

* **FP8**: every linear keeps its own scales: the weight scale is ``max|w| / 448`` of the weight
  in the calibration's compute dtype (what the weight quantizer's ``max`` calibrator records), the
  input scale the store's (the linears of a fused group read one input tensor, so the group
  maximum is each one's own).
* **SmoothQuant, AWQ**: each linear is rebuilt as modelopt left it after calibration -- the
  source weight multiplied by the recorded float32 smoothing factor, its own pre_quant_scale and
  input amax (quantize/unified/store_entries.py), a weight quantizer that re-collects ``max|w'|``
  per row / block -- and handed to :func:`quantize.unified.tensors.layer_tensors`, the same
  fusion, re-smoothing and norm folding as the whole-model path.
* **FP8 KV cache**: ``k_scale`` / ``v_scale`` = the stored raw amax / 448.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from common.errors import UserError

from ..modelopt_state import sanitize_amax, weight_absmax
from ..torch_io import read_tensor
from .store_entries import INPUT_AMAX, KV_AMAX, PRE_QUANT_SCALE, SMOOTHING, kept
from .tensors import ENCODE, FP8_MAXBOUND, KV_MAXBOUND, LAYOUT, layer_tensors

Tensor = torch.Tensor
#: modelopt's SmoothQuant input quantizer: int8 (INT8_SMOOTHQUANT_CFG)
_INPUT_BITS = 8


class StoredQuantizer:
    """A stand-in for a calibrated modelopt ``TensorQuantizer`` in the attributes
    :func:`layer_tensors` reads (``amax``, ``maxbound``, ``axis``, its pre_quant_scale,
    ``export_amax()``), made from the store's entries."""

    def __init__(self, num_bits: int, amax: Tensor | None = None, axis=None,
                 pre_quant_scale: Tensor | None = None, enabled: bool = True):
        self.num_bits, self.amax, self.axis, self.is_enabled = num_bits, amax, axis, enabled
        self.maxbound = float((1 << (num_bits - 1)) - 1)
        self._pre_quant_scale = self.pre_quant_scale = pre_quant_scale

    def export_amax(self) -> Tensor:
        return sanitize_amax(self.amax, self.maxbound)


class _Norms:
    """``get_submodule(name).weight``: a decoder norm from the source, in the compute dtype (what
    AWQ folds the fused pre_quant_scale into)."""

    def __init__(self, source, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def get_submodule(self, name: str):
        return SimpleNamespace(weight=read_tensor(self.source, f"{name}.weight").to(self.dtype))


class StoreLayers:
    """The unified tensors of one decoder layer at a time (the last one kept), from the
    calibration store's layer (``load_layer(i, dtype)``) and the source weights; for the formats
    whose recipe has :meth:`Recipe.unified_layerwise`."""

    def __init__(self, load_layer, source, spec, dtype: torch.dtype, compute_dtype: torch.dtype,
                 num_layers: int, family=LAYOUT):
        self.load_layer, self.source, self.spec = load_layer, source, spec
        self.family = family  # the spec naming the layers' HF linears
        self.num_layers = num_layers
        self.dtype, self.compute_dtype = dtype, compute_dtype
        self.fmt = spec.format.unified
        self._cached: tuple[int, dict] | None = None
        self._template: dict | None = None

    def names(self, i: int) -> dict[str, tuple[tuple, torch.dtype]]:
        """Layer ``i``'s unified names -> (shape, dtype): layer 0's, renumbered (every decoder
        layer of a dense model has the same shapes); layer 0 stays cached for the writer."""
        if self._template is None:
            self._template = {n.split(".", 3)[3]: (tuple(t.shape), t.dtype)
                              for n, t in self._layer(0).items()}
        return {f"model.layers.{i}.{k}": v for k, v in self._template.items()}

    @torch.no_grad()
    def tensor(self, i: int, name: str) -> Tensor:
        return self._layer(i)[name]

    def _layer(self, i: int) -> dict[str, Tensor]:
        if self._cached is None or self._cached[0] != i:
            self._cached = None  # one layer held at a time
            self._cached = (i, self._compute(i))
        return self._cached[1]

    @torch.no_grad()
    def _compute(self, i: int) -> dict[str, Tensor]:
        state = self.load_layer(i, self.dtype)
        prefix = f"model.layers.{i}"
        out: dict[str, Tensor] = {}
        if self.fmt.weight is not None and not self.fmt.from_float_weights:
            if self.fmt.per_tensor_weight_scale:
                self._fp8(i, state, out)
            elif self.fmt.weight not in ENCODE:  # the recipe's own (NVFP4)
                self._own(i, state, out)
            else:
                layer_tensors(_Norms(self.source, self.compute_dtype), prefix,
                              self._smoothed(i, state), self.spec, self.dtype, out, self.family)
        if kept(self.spec)[1]:  # the raw k/v amax
            attn = LAYOUT.attention[0]
            for x, entry in KV_AMAX.items():
                amax = self._entry(state, i, f"{prefix}.{attn}.{entry}")
                out[f"{prefix}.{attn}.{x}_proj.{x}_scale"] = amax.float() / KV_MAXBOUND
        return {k: v.contiguous() for k, v in out.items()}

    def _entry(self, state: dict, i: int, name: str) -> Tensor:
        t = state.get(name)
        if t is None:
            raise UserError(f"calibration store layer {i} has no {name.rsplit('.', 1)[-1]} for "
                            f"{self.spec.name} (made for another format, or by a build_engine "
                            f"that kept no unified-checkpoint entries); drop --calibration to "
                            f"calibrate afresh")
        return t

    def _fp8(self, i: int, state: dict, out: dict) -> None:
        for h in self.family.hf_linears():
            p = f"model.layers.{i}.{h}"
            w = read_tensor(self.source, f"{p}.weight").to(self.dtype)
            amax = w.to(self.compute_dtype).abs().amax().float()
            scale = amax / FP8_MAXBOUND
            out[f"{p}.weight"] = ENCODE[self.fmt.weight](w, scale)
            out[f"{p}.weight_scale"] = scale
            act = self._entry(state, i, f"{p}.activation_scaling_factor")
            out[f"{p}.input_scale"] = act.reshape(())

    def _own(self, i: int, state: dict, out: dict) -> None:
        """A recipe that encodes its linears itself: its unified tensors from the store's
        TensorRT-LLM ones of each linear and the source weight in the checkpoint dtype."""
        for h in self.family.hf_linears():
            p = f"model.layers.{i}.{h}"
            trtllm = {k: self._entry(state, i, f"{p}.{k}")
                      for k in self.spec.format.linear_export.tensors if k != "weight"}
            w = read_tensor(self.source, f"{p}.weight").to(self.dtype)
            for k, v in self.spec.format.unified_linear(trtllm, w).items():
                out[f"{p}.{k}"] = v

    def _smoothed(self, i: int, state: dict) -> dict:
        """Layer ``i``'s linears as modelopt's smoothing left them (stand-ins, by full name)."""
        bits = self.spec.format.linear_export.num_bits
        linears = {}
        for h in self.family.hf_linears():
            p = f"model.layers.{i}.{h}"
            w = read_tensor(self.source, f"{p}.weight").to(self.compute_dtype)
            factor = self._entry(state, i, f"{p}.{SMOOTHING}")
            w = (w * factor.to(w.device)[None, :]).to(w.dtype)  # modelopt's in-place smoothing
            amax = state.get(f"{p}.{INPUT_AMAX}")
            iq = StoredQuantizer(_INPUT_BITS, amax=amax, enabled=amax is not None,
                                 pre_quant_scale=self._entry(state, i, f"{p}.{PRE_QUANT_SCALE}"))
            wq = StoredQuantizer(bits, axis=0)
            wq.amax = weight_absmax(w, wq, self.spec.group_size)  # max_calibrate of the weight
            linears[p] = SimpleNamespace(weight=w, input_quantizer=iq, weight_quantizer=wq)
        return linears
