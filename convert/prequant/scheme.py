"""``quantization_config`` of a pre-quantized model directory -> :class:`SourceQuant` (what the
tensors hold), or a one-line refusal naming what is wrong and the way out.

The packers' formats (read in their sources):

* ``gptq`` (AutoGPTQ ``QuantLinear.pack``, GPTQModel's ``checkpoint_format: gptq``): ``qweight``
  int32 ``[in/8, out]`` -- nibble ``i`` of word ``[k, o]`` is input ``8k+i``; ``qzeros`` int32
  ``[in/g, out/8]`` -- nibble ``i`` of ``[j, c]`` is output ``8c+i``, storing ``zero - 1``
  (``gptq_v2``: ``zero``); ``scales`` ``[in/g, out]``; ``w = scale * (q - zero)``. ``desc_act``
  (act-order) reorders the groups through ``g_idx``: refused (TensorRT-LLM's groupwise kernel
  takes contiguous groups).
* ``awq`` (AutoAWQ ``WQLinear_GEMM.from_linear``, ``version: gemm``): ``qweight`` int32
  ``[in, out/8]`` -- nibble ``i`` of word ``[k, c]`` is output ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``;
  ``qzeros`` int32 ``[in/g, out/8]`` in the same order; ``scales`` ``[in/g, out]``;
  ``w = scale * (q - zero)`` (always with zero points).
* ``compressed-tensors``, ``format: pack-quantized`` (``pack_to_int32``): ``weight_packed`` int32
  ``[out, in/8]`` -- nibble ``i`` of word ``[o, k]`` is input ``8k+i``, the signed value plus 8;
  ``weight_scale`` ``[out, in/g]``; asymmetric: ``weight_zero_point`` int32 ``[out/8, in/g]``
  (packed along the output dimension, plus 8); ``w = scale * (q - zero_point)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError

METHODS = ("gptq", "awq", "compressed-tensors")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class SourceQuant:
    """What a pre-quantized directory's linears hold."""

    method: str                  # "gptq" | "awq" | "compressed-tensors"
    group_size: int
    sym: bool                    # no zero points (zero 8 for gptq, 0 for compressed-tensors)
    zero_offset: int = 0         # added to gptq's stored zeros (1 for checkpoint_format gptq)
    ignore: tuple[str, ...] = ()  # modules left in float by the packer (their names)
    fp8: str | None = None       # fp8 weights: "tensor" / "channel" scales (``weight_scale``)
    static_input: bool = False   # fp8: static per-tensor ``input_scale`` beside each weight

    @property
    def quant_algo(self) -> str:
        """The TensorRT-LLM format written (see quantize/recipes/prequantized)."""
        return "FP8_PER_CHANNEL_PER_TOKEN" if self.fp8 else "W4A16_AWQ"

    @property
    def words(self) -> str:
        if self.fp8:
            return f"{self.method} fp8 e4m3, per-{self.fp8} weight scales"
        return f"{self.method} int4, group {self.group_size}, {'sym' if self.sym else 'asym'}"


def _refuse(what: str, fix: str = "") -> UserError:
    return UserError(f"the model's quantization_config {what}; {fix or 'convert its float model instead'}")


def read_source_quant(raw: dict) -> SourceQuant | None:
    """The source quantization of config.json ``raw`` (None: a float model)."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _refuse(f"is {type(qc).__name__}, not an object")
    method = qc.get("quant_method")
    if method == "fp8" and qc.get("weight_block_size"):  # transformers' FineGrainedFP8 (DeepSeek)
        raise _refuse(f"has block-scaled fp8 weights (weight_block_size "
                      f"{qc.get('weight_block_size')}, weight_scale_inv: FP8_BLOCK_SCALES, which "
                      f"TensorRT-LLM 1.2 runs on its PyTorch backend only, "
                      f"_torch/modules/linear.py; the engine flow's quantization/layers.py has no "
                      f"such linear)", "use --target pytorch (which reads the weights dequantized, "
                      "convert/block_fp8.py), or convert its float model")
    if method not in METHODS:
        raise _refuse(f"has quant_method {method!r}; supported pre-quantized inputs: "
                      f"{', '.join(METHODS)}")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise _refuse(f"has bits {bits!r}: only 4-bit {method} converts here (8-bit groupwise "
                      f"would be TensorRT-LLM's W8A16_GPTQ, which this tool does not write)")
    group = _group(qc.get("group_size", qc.get("q_group_size")), method)
    if method == "gptq":
        return _gptq(qc, group)
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(f"has AWQ version {version!r}: only AutoAWQ's GEMM packing converts",
                      "re-export it with version gemm, or convert its float model")
    if qc.get("zero_point", True) is not True:
        raise _refuse("has AWQ zero_point false, which AutoAWQ's GEMM packing does not write")
    return SourceQuant("awq", group, sym=False, ignore=_names(qc.get("modules_to_not_convert")))


def _group(value, method: str) -> int:
    if value not in GROUP_SIZES:
        raise _refuse(f"has group_size {value!r}: supported {method} group sizes are "
                      f"{', '.join(map(str, GROUP_SIZES))} (TensorRT-LLM's groupwise kernels; "
                      f"-1, per channel, is not one)")
    return value


def _names(value) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else ()


def _gptq(qc: dict, group: int) -> SourceQuant:
    if qc.get("desc_act"):
        raise _refuse("has desc_act true (act-order: g_idx assigns each input its group out of "
                      "order, and TensorRT-LLM's groupwise kernel takes contiguous groups)",
                      "use a desc_act false export of the model, or convert its float model")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(f"has GPTQ checkpoint_format {fmt!r}; supported: gptq, gptq_v2")
    return SourceQuant("gptq", group, sym=bool(qc.get("sym", True)),
                       zero_offset=1 if fmt == "gptq" else 0,
                       ignore=_names(qc.get("modules_to_not_convert")))


def _compressed_tensors(qc: dict) -> SourceQuant:
    fmt = qc.get("format")
    if fmt not in ("pack-quantized", "float-quantized"):
        raise _refuse(f"is compressed-tensors format {fmt!r}; pack-quantized int4 and "
                      f"float-quantized fp8 convert")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(f"has {len(groups)} compressed-tensors config_groups: mixed schemes do not "
                      f"convert (one quant_algo per checkpoint)")
    scheme = next(iter(groups.values()))
    w = scheme.get("weights") or {}
    if fmt == "float-quantized":
        return _ct_fp8(qc, w, scheme.get("input_activations") or {})
    if scheme.get("input_activations") or scheme.get("output_activations"):
        raise _refuse("quantizes activations too: only weight-only int4 (W4A16) converts")
    if w.get("num_bits") != 4 or w.get("type", "int") != "int":
        raise _refuse(f"has {w.get('type', 'int')} weights of {w.get('num_bits')!r} bits: only "
                      f"int4 converts (TensorRT-LLM's groupwise kernels)")
    if w.get("strategy") != "group":
        raise _refuse(f"has weight strategy {w.get('strategy')!r}: only group converts")
    if w.get("actorder") not in (None, False):
        raise _refuse(f"has actorder {w.get('actorder')!r} (g_idx assigns each input its group "
                      f"out of order, and TensorRT-LLM's groupwise kernel takes contiguous groups)",
                      "use an export without actorder, or convert its float model")
    ignore = tuple(n for n in _names(qc.get("ignore")) if not n.startswith("re:"))
    return SourceQuant("compressed-tensors", _group(w.get("group_size"), "compressed-tensors"),
                       sym=bool(w.get("symmetric", True)), ignore=ignore)


def _ct_fp8(qc: dict, w: dict, inputs: dict) -> SourceQuant:
    """compressed-tensors ``float-quantized`` (llm-compressor's FP8 / FP8_DYNAMIC schemes):
    ``weight`` float8_e4m3fn [out, in] and ``weight_scale`` [1] (per tensor) or [out, 1] (per
    channel); ``w = weight * weight_scale``. The activations' scheme (static per-tensor
    ``input_scale`` or dynamic per token) does not change the weights."""
    if w.get("num_bits") != 8 or w.get("type") != "float":
        raise _refuse(f"has {w.get('type')} weights of {w.get('num_bits')!r} bits in a "
                      f"float-quantized checkpoint: only fp8 (e4m3) converts")
    strategy = w.get("strategy")
    if strategy == "block":
        raise _refuse("has block-scaled fp8 weights (FP8_BLOCK_SCALES: TensorRT-LLM 1.2 runs "
                      "them on its PyTorch backend only, _torch/modules/linear.py; the engine "
                      "flow's quantization/layers.py has no such linear)", "convert its float "
                      "model instead, or serve the directory with TensorRT-LLM's PyTorch backend")
    if strategy not in ("tensor", "channel"):
        raise _refuse(f"has fp8 weight strategy {strategy!r}: tensor and channel convert")
    static = inputs.get("dynamic") is False and inputs.get("strategy") == "tensor"
    return SourceQuant("compressed-tensors", 0, sym=True, fp8=strategy, static_input=static,
                       ignore=tuple(n for n in _names(qc.get("ignore")) if not n.startswith("re:")))
