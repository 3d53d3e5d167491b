"""TensorRT-LLM's plugin SmoothQuant calibrated on the WHOLE loaded model: the reference that the
layer-wise path (quantize/sq_layerwise.py) equals bit for bit (tests/test_sq_plugin_layerwise.py),
kept for the tests and benchmarks. Builds never call it."""
from __future__ import annotations

from dataclasses import dataclass

from .formats import QuantSpec
from .smoothquant import (SmoothedLayer, capture_ranges, hf_layers, is_mha, smooth_model,
                          smoothquant_val)
from .sq_search import SEARCH_TOKENS, search_alphas


@dataclass
class PluginCalibration:
    """A calibrated model smoothed for the plugin recipe: what :func:`plugin_rank_tensors` shards."""

    layers: list[SmoothedLayer]
    alphas: list[float]
    search: dict | None = None

    @property
    def smoothquant_val(self) -> float:
        return smoothquant_val(self.alphas)


def calibrate_plugin(hf_dir_or_model, spec: QuantSpec, calib_text: str | None = None, *,
                     tokenizer=None, progress: bool = True) -> PluginCalibration:
    """Load (or take) the WHOLE model, capture its activation ranges on the calibration text, choose
    alpha (``spec.smoothquant_alpha``, or searched per layer), and smooth every layer.

    The whole-model reference: builds calibrate layer by layer from the safetensors
    (quantize/sq_layerwise.py), which tests/test_sq_plugin_layerwise.py checks against this bit for
    bit; kept for those tests, ``convert_checkpoint(calibrated_model=...)`` and
    benchmarks/bench_quality.py."""
    from .calibrate import calibration_inputs  # loads the model: transformers

    model, batches, _ = calibration_inputs(hf_dir_or_model, spec, calib_text, tokenizer=tokenizer)
    keep = SEARCH_TOKENS if spec.sq_alpha_search else 0
    ranges = capture_ranges(model, batches, progress=progress, keep_inputs=keep)
    n = len(hf_layers(model))
    mha = is_mha(model.config)
    search = None
    if spec.sq_alpha_search:
        alphas, search = search_alphas(model, ranges, spec.quant_algo, mha=mha)
    else:
        alphas = [spec.smoothquant_alpha] * n
    return PluginCalibration(smooth_model(model, ranges, alphas), alphas, search)
