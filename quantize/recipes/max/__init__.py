"""The max-calibrated recipe: FP8 (modelopt's FP8_DEFAULT_CFG, ``max`` algorithm), calibrated by
forward hooks that record running maxima, layer by layer, without modelopt
(quantize/max_layerwise.py). A KV cache alone (any recipe without weight calibration) is
max-calibrated the same way (quantize/recipes/base.py)."""
from __future__ import annotations

import copy

from common.errors import UserError

from ...algos import FP8, MODELOPT_EXCLUDE_MODULES
from ..base import MAX, Recipe
from ..parts import LinearExport, MemoryModel, UnifiedFormat
from ..moe import MoeCalibrated


class Fp8(Recipe):
    """FP8 (e4m3) weights and activations, per-tensor scales."""

    quant_algo = FP8
    flag = "--fp8"
    exclude_modules = MODELOPT_EXCLUDE_MODULES
    weight_calibration = MAX
    max_linears = True
    #: the float32 layer only, its fp8 weights made in blocks (fitted: 8B-shaped, 4 x 64 tokens,
    #: CPU: 1.49 / 1.50 GB peak RSS at 4 / 16 layers)
    memory = MemoryModel(weight_bytes=1.0, layer_factor=1.0, hooks=True)
    moe = MoeCalibrated()
    #: modelopt's unified FP8: no fusion (each linear keeps its own scales), written layer by
    #: layer from the calibration store (the q/k/v and gate/up inputs are one tensor, so the
    #: store's fused input scale is each linear's; weight scales come from the weights)
    #: writer: fitted to FP8 + FP8 KV (8B- and 1B-shaped peaks, BENCHMARKS.md "--target pytorch")
    unified = UnifiedFormat(weight="fp8", per_tensor_weight_scale=True, layerwise=True,
                            writer_layers=0.3, writer_embedding=1.3, moe=True,
                            quantization_config_extra=(("config_groups", {"group_0": {
                                "input_activations": {"dynamic": False, "num_bits": 8,
                                                      "type": "float"},
                                "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                                "targets": ["Linear"]}}),))
    linear_export = LinearExport("fp8", (4, 3), ("qkv", "gate_up"),
                                 ("weight", "weights_scaling_factor", "activation_scaling_factor"))

    def check_kv(self, kv: str | None) -> None:
        """An INT8 KV cache is refused; FP8 and NVFP4 (``--target pytorch``) KV caches pair."""
        if kv == "INT8":
            raise UserError(
                "--fp8 with --kv-cache-dtype int8 is not supported: TensorRT-LLM's FP8 recipe pairs "
                "FP8 GEMMs with an FP8 KV cache (FP8 context FMHA); use --kv-cache-dtype fp8")

    def _modelopt_weights(self, spec, mtq) -> dict:
        return copy.deepcopy(mtq.FP8_DEFAULT_CFG)
