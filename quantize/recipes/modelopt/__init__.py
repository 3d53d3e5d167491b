"""The modelopt-calibrated recipes: modelopt's SmoothQuant (W8A8_SQ_PER_CHANNEL,
INT8_SMOOTHQUANT_CFG) and INT4 AWQ (W4A16_AWQ, INT4_AWQ_CFG), calibrated by modelopt one decoder
layer at a time (quantize/layerwise.py) and extracted by quantize/modelopt_state.py."""
from __future__ import annotations

import copy
from typing import Mapping

from common.errors import UserError

from ...algos import (AWQ_GROUP_SIZES, DEFAULT_AWQ_GROUP_SIZE, DEFAULT_SMOOTHQUANT_ALPHA, MODELOPT_EXCLUDE_MODULES,
                      SMOOTHQUANT, W4A16_AWQ, W4A8_AWQ)
from ..base import MODELOPT, SQ_SUBFLAGS, Recipe, refuse_subflags
from ..parts import LinearExport, MemoryModel, UnifiedFormat
from ..moe import SMOOTHQUANT_REFUSED, MoeAwq
from ..sq_plugin import check_alpha, check_smoothquant_tp


class ModeloptSmoothQuant(Recipe):
    """W8A8_SQ_PER_CHANNEL: int8 weights per channel, one static int8 scale per activation tensor."""

    quant_algo = SMOOTHQUANT
    flag = "--smoothquant"
    exclude_modules = MODELOPT_EXCLUDE_MODULES
    weight_calibration = MODELOPT
    memory = MemoryModel(weight_bytes=1.0, layer_factor=1.6, hooks=False)
    moe = SMOOTHQUANT_REFUSED
    #: q/k/v and gate/up fused (averaged pre_quant_scale, re-smoothed weights, max input amax),
    #: layer by layer from the store's per-linear pre_quant_scale, smoothing factor and input amax
    #: writer: the seven weights rebuilt smoothed in float32 + the fused copies, and the float32
    #: embedding (fitted: 8B- and 1B-shaped peaks, BENCHMARKS.md "--target pytorch")
    unified = UnifiedFormat(weight="int8_rows", fuse_shared_inputs=True, layerwise=True,
                            writer_layers=1.65, writer_embedding=1.5, note=(
        "build_engine: note: --target pytorch writes SmoothQuant as modelopt's recipe "
        "(W8A8_SQ_PER_CHANNEL, the only one a unified checkpoint has), and TensorRT-LLM's PyTorch "
        "backend has no INT8 SmoothQuant method "
        "(tensorrt_llm/_torch/modules/linear.py get_quant_method; see README, Targets): this "
        "unified checkpoint is for other loaders of modelopt's format; for TensorRT-LLM use "
        "--fp8, --awq or --int8-weight-only, or --target engine"))
    linear_export = LinearExport("int8", 8, ("qkv",), ("weight", "weights_scaling_factor",
                                 "activation_scaling_factor", "prequant_scaling_factor"))

    def resolve_flags(self, args) -> str:
        from ...flags import sq_algo  # --sq-recipe / --sq-activations / --sq-weights
        return sq_algo(args)

    def alpha(self, value, kv):
        if value == "auto":
            raise UserError("--smoothquant auto searches alpha for TensorRT-LLM's recipe only; give "
                            "--sq-recipe modelopt a number (default 1.0) or drop --sq-recipe")
        return check_alpha(DEFAULT_SMOOTHQUANT_ALPHA if value is None else float(value)), False

    def check_tp(self, spec, num_kv_heads: int, tp: int) -> None:
        check_smoothquant_tp(num_kv_heads, tp)

    kv_duplication = False  # per-channel k/v scales

    def _modelopt_weights(self, spec, mtq) -> dict:
        cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
        cfg["algorithm"] = {"method": "smoothquant", "alpha": spec.smoothquant_alpha}
        return cfg

    def _weight_label(self, spec) -> str:
        alpha = "auto" if spec.sq_alpha_search else f"{spec.smoothquant_alpha:g}"
        return f"{self.quant_algo} (alpha {alpha})"

    def words(self, spec) -> str:
        return (f"modelopt {self.quant_algo} (alpha {spec.smoothquant_alpha:g}): int8 weights per channel, "
                "int8 activations with one static scale per tensor")


class Awq(Recipe):
    """W4A16_AWQ: int4 group-wise weights with activation-aware pre-quant scales."""

    quant_algo = W4A16_AWQ
    flag = "--awq"
    exclude_modules = MODELOPT_EXCLUDE_MODULES
    pre_quant_scale = True
    weight_calibration = MODELOPT
    #: modelopt's AWQ per layer: two forward-loop passes, the search holds every batch's inputs
    memory = MemoryModel(weight_bytes=0.5, layer_factor=1.8, hooks=False, passes=2, search_inputs=True,
                         group_scales=True)
    moe = MoeAwq()
    #: q/k/v and gate/up fused, their pre_quant_scale folded into the norms (layer by layer from
    #: the store's own pre_quant_scale and smoothing factor per linear)
    #: writer: fitted as SmoothQuant's
    unified = UnifiedFormat(weight="int4", fuse_shared_inputs=True, fold_into_norm=True, moe=True,
                            layerwise=True, writer_layers=3.0, writer_embedding=1.1)
    #: modelopt's AWQ export pads the vocabulary to a multiple of 64 (the padded rows are zero)
    vocab_multiple = 64
    gemm_multiples = (64, 64)  # TensorRT-LLM's W4A16 group-wise GEMM, as for W4A16
    padding_layer = "WeightOnlyGroupwiseQuantLinear"
    linear_export = LinearExport("int4", 4, ("qkv",), ("weight", "weights_scaling_factor",
                                                       "prequant_scaling_factor"))

    def resolve_flags(self, args) -> str:
        """--awq alone: W4A16_AWQ; with --awq-act fp8: W4A8_AWQ (quantize/recipes/w4a8_awq)."""
        refuse_subflags(args, SQ_SUBFLAGS)
        return W4A8_AWQ if getattr(args, "awq_act", None) == "fp8" else self.quant_algo

    def group_size(self, awq_block_size: int | None) -> int:
        group_size = DEFAULT_AWQ_GROUP_SIZE if awq_block_size is None else int(awq_block_size)
        if group_size not in AWQ_GROUP_SIZES:
            raise UserError(f"--awq-block-size {group_size} is not supported by TensorRT-LLM's "
                            f"INT4 group-wise kernels; use one of {', '.join(map(str, AWQ_GROUP_SIZES))}")
        return group_size

    def check_linear_shapes(self, spec, in_dims, out_dims, unpadded_in=None) -> None:
        """Whole AWQ groups per rank (the calibration sees the unpadded inputs too), then the
        W4A16 GEMM's multiples."""
        dims = {**in_dims, **(unpadded_in or {})}
        check_awq_divisibility(dims, spec.group_size)
        super().check_linear_shapes(spec, dims, out_dims)

    def feature_multiple(self, spec) -> int:
        """``WeightOnlyGroupwiseQuantLinear`` / ``RowLinear`` (tensorrt_llm/quantization/layers.py,
        1.x) pad to a multiple of max(64, group_size) x tp (128 for W4A8, not written here)."""
        return max(64, spec.group_size)

    def calibration_block(self, spec) -> int:
        return spec.group_size

    def feature_fix(self, spec) -> str:
        return "try --awq-block-size 64" if spec.group_size > 64 else "choose another format"

    def _modelopt_weights(self, spec, mtq) -> dict:
        cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
        set_awq_block_size(cfg, spec.group_size)
        return cfg

    def _block_extras(self, spec) -> dict:
        return {"group_size": spec.group_size, "has_zero_point": spec.has_zero_point,
                "pre_quant_scale": spec.pre_quant_scale}

    def _weight_label(self, spec) -> str:
        return f"{self.quant_algo} (group {spec.group_size})"


def check_awq_divisibility(in_dims_per_rank, group_size: int = DEFAULT_AWQ_GROUP_SIZE) -> None:
    """AWQ preflight: every linear's per-rank input size must be a multiple of the group size.

    ``in_dims_per_rank``: {layer name: input features on one rank} (e.g. ``{"attention.dense":
    hidden // tp, "mlp.proj": intermediate // tp, "attention.qkv": hidden, ...}``), or plain sizes.
    Raises UserError naming the first offending layer (modelopt would fail in its export with
    "Weight shape ... is not divisible for block size"; TensorRT-LLM's kernels need whole groups).
    """
    if isinstance(in_dims_per_rank, Mapping):
        items = list(in_dims_per_rank.items())
    else:
        items = [x if isinstance(x, tuple) else (None, x) for x in in_dims_per_rank]
    for name, dim in items:
        if dim <= 0 or dim % group_size:
            what = f"{name} " if name else ""
            alt = [g for g in AWQ_GROUP_SIZES if g != group_size and dim > 0 and dim % g == 0]
            hint = (f"choose a --tp that keeps it a multiple of {group_size}"
                    + (f", or --awq-block-size {alt[0]}" if alt else ""))
            raise UserError(f"--awq: {what}input size per rank {dim} is not a multiple of the AWQ group "
                            f"size {group_size}; {hint}")


def set_awq_block_size(cfg: dict, group_size: int) -> None:
    found = False
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            wq = entry["cfg"][0] if isinstance(entry["cfg"], list) else entry["cfg"]
            wq["block_sizes"][-1] = group_size
            found = True
    if not found:  # pragma: no cover - guards against a modelopt layout change
        raise RuntimeError("modelopt's INT4_AWQ_CFG has no '*weight_quantizer' entry to set the block size on")
