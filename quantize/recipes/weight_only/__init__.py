"""The weight-only recipes (W8A16, W4A16): the checkpoint carries float weights and TensorRT-LLM's
trtllm-build quantizes them per channel; nothing to calibrate (a KV cache alone is
max-calibrated, quantize/recipes/base.py)."""
from __future__ import annotations

from ...algos import TRTLLM_DEFAULT_EXCLUDE_MODULES
from ..base import Recipe, UnifiedFormat
from ..moe import MoeWeightOnly


class WeightOnly(Recipe):
    """INT8 or INT4 weight-only, per channel."""

    build_time_quantized = True
    #: written in full: any list replaces TensorRT-LLM's defaults (see quantize/algos.py)
    exclude_modules = TRTLLM_DEFAULT_EXCLUDE_MODULES

    def __init__(self, quant_algo: str, flag: str, gemm_multiples: tuple[int, int]):
        self.quant_algo, self.flag = quant_algo, flag
        self.gemm_multiples = gemm_multiples
        self.moe = MoeWeightOnly(*gemm_multiples)  # the experts' GEMMs, the same kernels
        # INT8: modelopt's INT8_WEIGHT_ONLY_CFG, streamed from the float weights; INT4 per channel
        # has no unified form (INT4 there is group-wise AWQ)
        self.unified = UnifiedFormat(weight="int8_rows", from_float_weights=True) \
            if gemm_multiples == (64, 32) else None

    def unified_refusal(self, spec) -> str | None:
        if self.unified is None:
            return ("--int4-weight-only has no modelopt unified-checkpoint format (INT4 there is "
                    "group-wise AWQ); use --awq, or --target engine for per-channel INT4 weight-only")
        return super().unified_refusal(spec)
