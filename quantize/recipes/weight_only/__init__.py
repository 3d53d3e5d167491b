"""The weight-only recipes (W8A16, W4A16): the checkpoint carries float weights and TensorRT-LLM's
trtllm-build quantizes them per channel; nothing to calibrate (a KV cache alone is
max-calibrated, quantize/recipes/base.py)."""
from __future__ import annotations

from ...algos import TRTLLM_DEFAULT_EXCLUDE_MODULES
from ..base import Recipe
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
