"""The table: per ``quant_algo``, what TensorRT-LLM 1.x declares after ``quantize()`` and what
``preprocess_weights`` does to the checkpoint's tensors first.

Read in NVIDIA/TensorRT-LLM's 1.x sources (the 1.1/1.2-era tree; ``quantization/layers.py`` read at
a snapshot that already has ``models/gpt_oss``, i.e. 1.1 or later):

- ``quantization/quantize.py`` ``quantize()``: FP8 → ``fp8_quantize``; SmoothQuant → ``smooth_quantize``
  (plugin algos: ``smooth_quantize_plugin`` replaces Attention / GatedMLP / RmsNorm — every layer,
  no ``exclude_modules``, ``ln_f`` skipped; ``W8A8_SQ_PER_CHANNEL``: ``smooth_quantize_ootb``);
  weight-only → ``weight_only_quantize`` (per channel) / ``weight_only_groupwise_quantize`` (AWQ);
  a KV-cache algo → ``kv_cache_quantize``; FP8 rowwise → ``fp8_rowwise_quantize`` (whole blocks,
  see ``FP8_ROWWISE``). ``quantize_layers`` replaces every ``ColumnLinear`` /
  ``RowLinear`` (and, for weight-only, ``Embedding``) whose module name matches no
  ``exclude_modules`` pattern (``fnmatchcase``; default list in ``DEFAULT_EXCLUDE``), passing the
  FULL in/out features (it multiplies the per-rank ones back by tp).
- ``quantization/layers.py``: the classes below, their ``Parameter`` shapes and dtypes.
- ``layers/moe.py`` ``MOEWeightWrapper``: the expert stacks (quantized when ``MixtureOfExperts`` is
  built with the layer's quant mode; an excluded MoE module is rebuilt in float).

Shapes are written in symbols the interpreter (``check/declared.py``) evaluates per rank:
``out``/``in`` are the linear's per-rank output/input features after TensorRT-LLM's padding
(``pad``), ``E`` the rank's experts, ``g`` the group size, ``b`` the weight bits.
"""
from __future__ import annotations

from dataclasses import dataclass

#: quantize_layers' default when config.json's exclude_modules is absent or null
#: (quantization/quantize.py, quantize_layers; '*fused_a' is a 1.x addition)
DEFAULT_EXCLUDE = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding",
                   "*block_embedding", "*shared_expert_gate", "*fused_a")


@dataclass(frozen=True)
class Param:
    """One declared parameter of a layer class: ``<module>.<suffix>``."""

    suffix: str
    dims: tuple[str, ...]
    dtype: str                 # "dtype" (config.json's), or a fixed one
    when: str | None = None    # a Scheme flag (or "row") that must hold for it to exist
    qkv_alt: tuple[str, ...] | None = None  # another shape accepted on attention.qkv (see SQ_PLUGIN)


@dataclass(frozen=True)
class Scheme:
    """What one quant_algo means to TensorRT-LLM's model classes and to preprocess_weights."""

    classes: str                          # the layer classes, for messages and the docs
    linear: tuple[Param, ...]             # per quantized ColumnLinear / RowLinear
    experts: tuple[Param, ...] | None     # per MOEWeightWrapper (None: not modelled here)
    pad: int = 0                          # pad full in/out features to a multiple of pad * tp
    groupwise: bool = False               # ... of max(pad, group_size) * tp
    bits: int = 16
    per_channel: bool = False             # SmoothQuant plugin: per-channel weight scales
    static: bool = False                  # SmoothQuant plugin: static activation scale
    plugin_sq: bool = False               # Attention / GatedMLP / RmsNorm replaced, no exclusions
    embedding: bool = False               # Embedding in quantize_layers' map (weight-only)
    rowwise: bool = False                 # fp8_rowwise_quantize: blocks replaced (FP8_ROWWISE)
    preprocess: str | None = None         # key of check.preprocess.TRANSFORMS


FLOAT_LINEAR = (Param("weight", ("out", "in"), "dtype"),)
FLOAT_EXPERTS = (Param("weight", ("E", "out", "in"), "dtype"),)

#: WeightOnlyQuantColumnLinear / RowLinear: int8 [in, out * bits / 8] (the kernel layout
#: preprocess_weights makes), per_channel_scale [out]; in/out padded to a multiple of 64 * tp
WEIGHT_ONLY = (Param("weight", ("in", "out*b/8"), "int8"),
               Param("per_channel_scale", ("out",), "dtype"))
#: MOEWeightWrapper, weight-only per channel (no padding): [E, in, out * bits / 8], [E, out]
WEIGHT_ONLY_EXPERTS = (Param("weight", ("E", "in", "out*b/8"), "int8"),
                       Param("per_channel_scale", ("E", "out"), "dtype"))

#: WeightOnlyGroupwiseQuantColumnLinear / RowLinear: int4 packed four to a 16-bit word in the model
#: dtype [in, out / 4], scales [in / group, out], pre-quant scale [1, in]; in/out padded to a
#: multiple of max(64, group) * tp (128 for W4A8)
GROUPWISE = (Param("weight", ("in", "out/4"), "dtype"),
             Param("weights_scaling_factor", ("in/g", "out"), "dtype"),
             Param("prequant_scaling_factor", ("1", "in"), "dtype", when="pre_quant_scale"),
             Param("zero", ("in/g", "out"), "dtype", when="zero"))
GROUPWISE_EXPERTS = (Param("weight", ("E", "in", "out/4"), "dtype"),
                     Param("weights_scaling_factor", ("E", "in/g", "out"), "dtype"),
                     Param("prequant_scaling_factor", ("1", "in"), "dtype", when="pre_quant_scale"),
                     Param("zero", ("E", "in/g", "out"), "dtype", when="zero"))

#: the same with ``use_w4a8_awq`` (W4A8_AWQ): ``alpha`` [1] float32 on both, the row linear also
#: ``activation_scaling_factor`` [1] float32 (it dequantizes an input that arrives in fp8); features
#: padded to a multiple of max(128, group) x tp
GROUPWISE_W4A8 = GROUPWISE + (Param("alpha", ("1",), "float32"),
                              Param("activation_scaling_factor", ("1",), "float32", when="row"))

#: FP8Linear / FP8RowLinear; MOEWeightWrapper with fp8_qdq: weight scale per expert [E, 1]
FP8 = (Param("weight", ("out", "in"), "float8_e4m3fn"),
       Param("weights_scaling_factor", ("1",), "float32"),
       Param("activation_scaling_factor", ("1",), "float32"))
FP8_EXPERTS = (Param("weight", ("E", "out", "in"), "float8_e4m3fn"),
               Param("weights_scaling_factor", ("E", "1"), "float32"),
               Param("activation_scaling_factor", ("1",), "float32"))

#: Int8SmoothQuantLinear / Int8SmoothQuantRowLinear (modelopt's W8A8_SQ_PER_CHANNEL, "ootb")
INT8_SQ = (Param("weight", ("out", "in"), "int8"),
           Param("weights_scaling_factor", ("out",), "float32"),
           Param("activation_scaling_factor", ("1",), "float32"),
           Param("prequant_scaling_factor", ("in",), "dtype"))

#: SmoothQuantLinear / SmoothQuantRowLinear (the plugin algos): per_channel_scale [1, out] or
#: [1, 1], act_scale [1, 1] when static, the row linear's smoother [1, in]. Per-tensor weights:
#: TensorRT-LLM's own llama converter (models/llama/convert.py, get_tllm_linear_sq_weight,
#: ``col_shape = shape if (is_qkv or per_channel) else [1, 1]``) writes qkv's scale as [1, out]
#: (q, k and v quantized apart); which shape SmoothQuantAttention's qkv then declares was not read
#: here, so both are accepted on attention.qkv (and only there).
SQ_PLUGIN = (Param("weight", ("out", "in"), "int8"),
             Param("per_channel_scale", ("1", "out"), "float32", when="per_channel"),
             Param("per_channel_scale", ("1", "1"), "float32", when="per_tensor",
                   qkv_alt=("1", "out")),
             Param("act_scale", ("1", "1"), "float32", when="static"),
             Param("smoother", ("1", "in"), "float32", when="row"))
#: SmoothQuantRmsNorm (input_layernorm, post_layernorm): scale_to_int [1] in the model dtype;
#: SmoothQuantAttention / SmoothQuantGatedMLP: quantization_scaling_factor [1] when static
SQ_NORM = (Param("scale_to_int", ("1",), "dtype"),)
SQ_BLOCK = (Param("quantization_scaling_factor", ("1",), "float32", when="static"),)

#: FP8 rowwise (``FP8_PER_CHANNEL_PER_TOKEN``), ``quantization/quantize.py``
#: ``fp8_rowwise_quantize``: not linear by linear but whole blocks — every ``GatedMLP`` / ``MLP`` →
#: ``Fp8RowwiseGatedMLP`` / ``Fp8RowwiseMLP``, ``Attention`` → ``Fp8RowwiseAttention``, ``RmsNorm``
#: → ``Fp8RowwiseRmsNorm`` — whose module name matches no pattern of ``exclude_modules`` (null:
#: none) plus ``ROWWISE_ALWAYS_EXCLUDE``; ``use_meta_recipe`` adds ``ROWWISE_META_EXCLUDE`` and
#: skips every module of the first stage's local layer 0 and of the last stage's last local layer.
#: The blocks' linears, ``Fp8RowwiseLinear`` / ``Fp8RowwiseRowLinear`` (``quantization/layers.py``):
#: ``weight [out, in]`` fp8, ``per_channel_scale [out]`` float32 (a column linear's out per rank, a
#: row linear's whole). ``Fp8RowwiseRmsNorm`` declares the float norm's ``weight``; the norm's and
#: the MLP's / attention's ``clamp_val`` [2] are buffers built from config.json's ``clamp_val``
#: (``is_buffer=True``, already initialised: not required at load). MixtureOfExperts is not in
#: the map: not modelled here.
FP8_ROWWISE = (Param("weight", ("out", "in"), "float8_e4m3fn"),
               Param("per_channel_scale", ("out",), "float32"))
#: added to exclude_modules by fp8_rowwise_quantize in the 1.1/1.2-era tree (the 1.0-era tree adds
#: '*ln_f', '*ln_embed' only when the key is null and takes a given list as it is)
ROWWISE_ALWAYS_EXCLUDE = ("*ln_f", "*ln_embed", "*lm_head")
ROWWISE_META_EXCLUDE = ("*input_layernorm", "*attention")

#: NVFP4 (``fp4_quantize``: ColumnLinear → ``FP4Linear``, RowLinear → ``FP4RowLinear``,
#: ``quantization/layers.py``) after ``preprocess_weights`` (check/preprocess.py ``nvfp4``):
#: ``weight`` is ``Parameter(trt.fp4, (out, in))``, whose value setter (``parameter.py``) takes
#: ``[out, in / 2]`` of uint8 (two E2M1 per byte); block scales ``[out, in / 16]`` e4m3 and their
#: 128 x 4 swizzled copy ``[pad_up(out, 128), pad_up(in / 16, 4)]``; three float32 [1] globals
#: (a 0-dim value fills a [1] parameter: the setter reshapes a scalar). ``FP4Linear`` asserts
#: ``in % 16 == 0`` and pads nothing.
NVFP4 = (Param("weight", ("out", "in/2"), "uint8"),
         Param("weights_block_scaling_factor", ("out", "in/16"), "float8_e4m3fn"),
         Param("weights_block_scaling_factor_interleaved", ("pad128(out)", "pad4(in/16)"),
               "float8_e4m3fn"),
         Param("weights_global_scaling_factor", ("1",), "float32"),
         Param("activation_global_scaling_factor", ("1",), "float32"),
         Param("alpha", ("1",), "float32"))

#: MOEWeightWrapper with nvfp4 (``layers/moe.py``) after preprocess_weights: the block scales and
#: their interleaved copy both declared [E, out, in/16] (the interleave pads nothing there:
#: quantize/recipes/moe ``MoeNvfp4`` refuses the shapes that would need it), one activation
#: global [1], ``alpha`` [E]; the per-expert weight globals are not declared (preprocess_weights
#: renames them to ``weights_global_scaling_factor``: provided, not required)
NVFP4_EXPERTS = (Param("weight", ("E", "out", "in/2"), "uint8"),
                 Param("weights_block_scaling_factor", ("E", "out", "in/16"), "float8_e4m3fn"),
                 Param("weights_block_scaling_factor_interleaved", ("E", "out", "in/16"),
                       "float8_e4m3fn"),
                 Param("activation_global_scaling_factor", ("1",), "float32"),
                 Param("alpha", ("E",), "float32"))

#: kv_cache_quantize: every Attention (1.x: both scales; 1.0-era trees declare only the first,
#: preprocess_weights then adds the reciprocal anyway)
KV_CACHE = (Param("kv_cache_scaling_factor", ("1",), "float32"),
            Param("kv_cache_rcp_scaling_factor", ("1",), "float32"))

_SQ = "SmoothQuantAttention / SmoothQuantGatedMLP / SmoothQuantRmsNorm"

SCHEMES: dict[str | None, Scheme] = {
    None: Scheme("Linear / RowLinear", FLOAT_LINEAR, FLOAT_EXPERTS),
    "W8A16": Scheme("WeightOnlyQuantColumnLinear / WeightOnlyQuantRowLinear", WEIGHT_ONLY,
                    WEIGHT_ONLY_EXPERTS, pad=64, bits=8, embedding=True, preprocess="weight_only"),
    "W4A16": Scheme("WeightOnlyQuantColumnLinear / WeightOnlyQuantRowLinear", WEIGHT_ONLY,
                    WEIGHT_ONLY_EXPERTS, pad=64, bits=4, embedding=True, preprocess="weight_only"),
    "W4A16_AWQ": Scheme("WeightOnlyGroupwiseQuantColumnLinear / WeightOnlyGroupwiseQuantRowLinear",
                        GROUPWISE, GROUPWISE_EXPERTS, pad=64, groupwise=True, bits=4,
                        preprocess="awq"),
    "W4A8_AWQ": Scheme("WeightOnlyGroupwiseQuantColumnLinear / RowLinear (use_w4a8_awq)",
                       GROUPWISE_W4A8, None, pad=128, groupwise=True, bits=4, preprocess="w4a8_awq"),
    "FP8": Scheme("FP8Linear / FP8RowLinear", FP8, FP8_EXPERTS, bits=8, preprocess="fp8"),
    "FP8_PER_CHANNEL_PER_TOKEN": Scheme("Fp8RowwiseGatedMLP / Fp8RowwiseAttention (Fp8RowwiseLinear "
                                        "/ Fp8RowwiseRowLinear)", FP8_ROWWISE, None, bits=8,
                                        rowwise=True, preprocess="fp8_rowwise"),
    "NVFP4": Scheme("FP4Linear / FP4RowLinear", NVFP4, NVFP4_EXPERTS, bits=4, preprocess="nvfp4"),
    "W8A8_SQ_PER_CHANNEL": Scheme("Int8SmoothQuantLinear / Int8SmoothQuantRowLinear", INT8_SQ,
                                  None, bits=8),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": Scheme(_SQ, SQ_PLUGIN, None, bits=8, per_channel=True,
                                                   plugin_sq=True),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": Scheme(_SQ, SQ_PLUGIN, None, bits=8, per_channel=True,
                                                    static=True, plugin_sq=True),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": Scheme(_SQ, SQ_PLUGIN, None, bits=8, plugin_sq=True),
    "W8A8_SQ_PER_TENSOR_PLUGIN": Scheme(_SQ, SQ_PLUGIN, None, bits=8, static=True, plugin_sq=True),
}

#: kv_cache_quant_algo values kv_cache_quantize acts on (QuantMode from_quant_algo)
KV_ALGOS = {"INT8": KV_CACHE, "FP8": KV_CACHE, None: ()}


def scheme_for(algo) -> Scheme | None:
    """The scheme of a quant_algo (None when this table does not model it)."""
    return SCHEMES.get(algo)


def flags(scheme: Scheme, quantization: dict, row: bool) -> set[str]:
    """The ``when`` flags that hold for a linear (``row``: a RowLinear) under ``scheme``."""
    out = {"row"} if row else set()
    out |= {"per_channel"} if scheme.per_channel else {"per_tensor"}
    out |= {"static"} if scheme.static else set()
    out |= {"pre_quant_scale"} if quantization.get("pre_quant_scale") else set()
    out |= {"zero"} if quantization.get("has_zero_point") else set()
    return out
