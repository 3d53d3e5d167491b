"""The weight-only recipes (W8A16, W4A16): the checkpoint carries float weights and TensorRT-LLM's
trtllm-build quantizes them per channel; nothing to calibrate (a KV cache alone is
max-calibrated, quantize/recipes/base.py)."""
from __future__ import annotations

from ...algos import TRTLLM_DEFAULT_EXCLUDE_MODULES
from ..base import Recipe
from ..parts import UnifiedFormat
from ..moe import MoeWeightOnly

#: TensorRT-LLM's weight-only GEMMs (fpA_intB) take the weight as [K = input features per rank,
#: N = output features per rank] and trtllm-build lays it out for the kernels with
#: ``preprocess_weights_for_mixed_gemm`` (cpp/tensorrt_llm/kernels/cutlass_kernels/
#: cutlass_preprocessors.cpp), which refuses other shapes (the ``gemm_multiples`` of RECIPES):
#: - K: ``interleave_column_major_tensor`` needs ``K % rows_per_tile == 0`` with rows_per_tile the
#:   kernels' ThreadblockK = 64 for uint8 and uint4b (cutlass_extensions/.../mixed_gemm_B_layout.h,
#:   Turing and newer); the file says "Our kernels only handle dims which are multiples of 64 for
#:   weight-only quantization" (also NVIDIA/TensorRT-LLM issue #729).
#: - N: ``subbyte_transpose`` needs both dims' byte counts to be multiples of 32 (its vector width):
#:   N % 32 for int8, N % 64 for packed int4.
#: AWQ's packed int4 weights go through the same preprocessing (``preprocess_weights_for_mixed_gemm``
#: with ``torch.quint4x2`` in TensorRT-LLM's AWQ/GPTQ weight loaders), so W4A16_AWQ has the int4
#: limits too (its K is also a multiple of the AWQ group, checked separately).


#: TensorRT-LLM 1.x's ``WeightOnlyQuantLinear`` / ``WeightOnlyQuantRowLinear``
#: (tensorrt_llm/quantization/layers.py) pad their full in and out features to a multiple of
#: 64 x tp; the MoE experts (layers/moe.py MOEWeightWrapper) do not pad.
WEIGHT_ONLY_FEATURE_MULTIPLE = 64


class WeightOnly(Recipe):
    """INT8 or INT4 weight-only, per channel."""

    build_time_quantized = True
    padding_layer = "WeightOnlyQuantLinear"
    #: written in full: any list replaces TensorRT-LLM's defaults (see quantize/algos.py)
    exclude_modules = TRTLLM_DEFAULT_EXCLUDE_MODULES

    def __init__(self, quant_algo: str, flag: str, gemm_multiples: tuple[int, int]):
        self.quant_algo, self.flag = quant_algo, flag
        self.gemm_multiples = gemm_multiples
        self.moe = MoeWeightOnly(*gemm_multiples)  # the experts' GEMMs, the same kernels
        # INT8: modelopt's INT8_WEIGHT_ONLY_CFG, streamed from the float weights; INT4 per channel
        # has no unified form (INT4 there is group-wise AWQ)
        self.unified = UnifiedFormat(weight="int8_rows", from_float_weights=True, moe=True) \
            if gemm_multiples == (64, 32) else None

    def feature_multiple(self, spec) -> int:
        return WEIGHT_ONLY_FEATURE_MULTIPLE

    def unified_refusal(self, spec) -> str | None:
        if self.unified is None:
            return ("--int4-weight-only has no modelopt unified-checkpoint format (INT4 there is "
                    "group-wise AWQ); use --awq, or --target engine for per-channel INT4 weight-only")
        return super().unified_refusal(spec)
