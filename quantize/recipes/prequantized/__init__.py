"""Pre-quantized int4 inputs (GPTQ, AWQ, compressed-tensors pack-quantized: convert/prequant/)
written as TensorRT-LLM's groupwise int4 checkpoint, without calibration.

Which ``quant_algo``: ``W4A16_AWQ`` with ``pre_quant_scale: false`` and ``has_zero_point`` for an
asymmetric source. TensorRT-LLM 1.2's ``quantize()`` builds the same layers for W4A16_AWQ and
W4A16_GPTQ (``weight_only_groupwise_quantize``: ``WeightOnlyGroupwiseQuantLinear`` with
``zero=has_zero_point``, ``pre_quant_scale=pre_quant_scale``); they differ only in
``preprocess_weights`` (``models/modeling_utils.py`` ``preprocess_perlayer_weights``): W4A16_AWQ's
checkpoint holds int4 ``[out/2, in]`` that it interleaves for the GPU it builds on
(``preprocess_weights_for_mixed_gemm``), while a W4A16_GPTQ checkpoint must already hold the
interleaved layout of one GPU architecture (``models/llama/convert.py``
``load_weights_from_gptq``, earlier ``load_from_gptq_llama``, calls that CUDA preprocessor,
``torch.ops.trtllm.preprocess_weights_for_mixed_gemm``, at conversion). Written here without a GPU, the portable layout is
W4A16_AWQ's.

The tensors of one rank's linear (``weights.py``): ``weight`` int8 ``[out/2, in]`` (the source's
codes, moved, never re-quantized), ``weights_scaling_factor`` float32 ``[out, in/g]`` (the source's
scales, exact; the engine casts them to the model dtype), and for an asymmetric source ``zero``
``[in/g, out]`` in the model dtype: ``scale * (8 - zero_point)``, rounded once, as TensorRT-LLM's
own GPTQ converter computes it (``zeros_x_scales_fp16``), so that ``(q - 8) * scale + zero`` is the
source's ``(q - zero_point) * scale``.
"""
from __future__ import annotations

from dataclasses import replace

from common.errors import UserError

from ...algos import FP8_ROWWISE, W4A16_AWQ
from ..base import Recipe
from ..max import Fp8
from ..moe import MoeRefused
from ..parts import MemoryModel, UnifiedFormat


class Prequantized(Recipe):
    """A pre-quantized int4 source, converted as it is (``spec.source_quant``)."""

    quant_algo = W4A16_AWQ
    flag = None
    exclude_modules = ("lm_head",)
    #: the recipe stages every packed linear from the source itself (``stage_plans``)
    stages_from_source = True
    memory = MemoryModel(weight_bytes=0.5)
    moe = MoeRefused("pre-quantized mixture-of-experts models do not convert here (their expert "
                     "stacks are not unpacked); convert the float model")
    #: --target pytorch (symmetric sources): modelopt's unified W4A16_AWQ, written by unified.py
    unified = UnifiedFormat(weight="int4", fuse_shared_inputs=True, fold_into_norm=True)

    def gated(self, spec) -> bool:
        return False  # the float reference would be the source's own dequantization

    def check_kv(self, kv) -> None:
        if kv is not None:
            raise UserError("a pre-quantized input converts without calibration: drop "
                            "--kv-cache-dtype (a quantized KV cache needs calibration data)")

    def check_linear_shapes(self, spec, in_dims, out_dims, unpadded_in=None) -> None:
        """Per rank: whole groups, and features TensorRT-LLM's groupwise linears do not pad
        (a multiple of max(64, group): packed int4 is not re-padded here)."""
        m = max(64, spec.group_size)
        for what, dims in (("input", {**in_dims, **(unpadded_in or {})}), ("output", out_dims)):
            for name, n in dims.items():
                if n % m:
                    raise UserError(f"pre-quantized int4: {name} has {n} {what} features per "
                                    f"rank, not a multiple of {m} (TensorRT-LLM's groupwise "
                                    f"linears would pad them); choose another --tp")

    def stage_plans(self, cplan, spec) -> None:
        """Every rank's planned packed linears -> their TensorRT-LLM tensors, computed (numpy,
        no torch) when the writer reaches them."""
        from .weights import stage, stage_plans

        stage_plans(cplan, spec, stage)

    def _block_extras(self, spec) -> dict:
        return {"group_size": spec.group_size, "has_zero_point": spec.has_zero_point,
                "pre_quant_scale": False}

    def unified_refusal(self, spec) -> str | None:
        if spec.has_zero_point:
            return ("an asymmetric pre-quantized int4 input has no unified checkpoint (modelopt's "
                    "W4A16_AWQ has no zero points); use --target engine")
        return None

    def unified_quantization(self, spec) -> dict | None:
        """modelopt's AWQ keys: its export keeps o_proj / down_proj's pre_quant_scale."""
        return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": None,
                "group_size": spec.group_size, "has_zero_point": False, "pre_quant_scale": True,
                "exclude_modules": ["lm_head", "model.embed_tokens"]}

    def _weight_label(self, spec) -> str:
        return f"{self.quant_algo} (pre-quantized {spec.source_quant.words})"


class PrequantizedFp8(Prequantized):
    """A pre-quantized fp8 source (per-tensor or per-channel weight scales), written as
    FP8_PER_CHANNEL_PER_TOKEN (fp8.py says why)."""

    quant_algo = FP8_ROWWISE
    exclude_modules = None
    memory = MemoryModel(weight_bytes=1.0)
    #: --target pytorch (per-tensor weight and static input scales): modelopt's unified FP8
    unified = replace(Fp8.unified, moe=False)

    def check_linear_shapes(self, spec, in_dims, out_dims, unpadded_in=None) -> None:
        """Fp8RowwiseLinear pads nothing."""

    def stage_plans(self, cplan, spec) -> None:
        from .fp8 import stage
        from .weights import stage_plans

        stage_plans(cplan, spec, stage)

    def quantization_block(self, spec) -> dict:
        from .fp8 import quantization_block

        return quantization_block(spec)

    def unified_refusal(self, spec) -> str | None:
        sq = spec.source_quant
        if sq.fp8 != "tensor" or not sq.static_input:
            return ("a pre-quantized fp8 input converts to modelopt's unified FP8 only with "
                    "per-tensor weight scales and static per-tensor input scales; use "
                    "--target engine")
        return None

    def unified_quantization(self, spec) -> dict | None:
        return FP8_UNIFIED.unified_quantization(spec)

    def unified_quantization_config(self, spec, hf_quant: dict) -> dict:
        return FP8_UNIFIED.unified_quantization_config(spec, hf_quant)


#: modelopt's unified FP8 keys, for a per-tensor fp8 source on --target pytorch
FP8_UNIFIED = Fp8()
PREQUANTIZED = Prequantized()
PREQUANTIZED_FP8 = PrequantizedFp8()


def prequantized_recipe(source_quant) -> Prequantized:
    """The recipe of a pre-quantized source (``convert.prequant.scheme.SourceQuant``)."""
    return PREQUANTIZED_FP8 if source_quant.fp8 else PREQUANTIZED
