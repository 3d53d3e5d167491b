"""Names and defaults of the quantization formats (TensorRT-LLM ``QuantAlgo`` names); sources in
quantize/NOTES.md. Shared by the flags (flags.py) and the spec (formats.py)."""
from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Defaults (sources in quantize/NOTES.md)
# ---------------------------------------------------------------------------------------------

#: SmoothQuant migration strength when ``--smoothquant`` is given without a value. modelopt's
#: ``INT8_SMOOTHQUANT_CFG`` names the algorithm "smoothquant" with no alpha, so its
#: ``SmoothQuantCalibConfig.alpha`` default applies: 1.0 (modelopt 0.47,
#: modelopt/torch/quantization/config.py). TensorRT-LLM's modelopt flow
#: (tensorrt_llm/quantization/quantize_by_modelopt.py, ``--qformat int8_sq``) uses that config
#: unchanged, overriding alpha to 0.5 only for Gemma. (0.5 is the SmoothQuant paper's value and the
#: default ``QuantConfig.smoothquant_val`` of TensorRT-LLM's own *plugin* SmoothQuant converters,
#: a different checkpoint format.)
DEFAULT_SMOOTHQUANT_ALPHA = 1.0
#: Default alpha of TensorRT-LLM's recipe. Its converter's ``QuantConfig.smoothquant_val`` default (and
#: the SmoothQuant paper's) is 0.5, but on SmolLM2 (BENCHMARKS.md "SmoothQuant recipes") 0.5 costs
#: +2.2 % perplexity and 0.75 +0.05 %, and ``--smoothquant auto`` picks 0.6-0.8 per layer (mostly
#: 0.7); on held-out news text the issue measured 0.5 and 0.75 within 0.3 % of each other. So 0.75;
#: ``--smoothquant 0.5`` is TensorRT-LLM's default exactly.
DEFAULT_SQ_PLUGIN_ALPHA = 0.75

#: AWQ group size: INT4_AWQ_CFG's block size, TensorRT-LLM's ``QuantConfig.group_size`` default and
#: ``examples/quantization/quantize.py --awq_block_size`` default.
DEFAULT_AWQ_GROUP_SIZE = 128
#: Group sizes TensorRT-LLM's W4A16 groupwise GEMM (weight-only groupwise plugin) accepts.
AWQ_GROUP_SIZES = (64, 128)

#: Calibration defaults: TensorRT-LLM's quantize.py uses 512 x 512 (and caps AWQ at 32 samples);
#: our shipped text is ~25k tokens, so 32 non-overlapping samples of 512 tokens fit in it.
DEFAULT_CALIB_SIZE = 32
DEFAULT_CALIB_SEQ_LEN = 512
DEFAULT_CALIB_BATCH_SIZE = 1

#: The calibration text shipped with the package (public-domain Shakespeare, see NOTES.md).
DEFAULT_CALIB_DATA = Path(__file__).resolve().parent / "data" / "calib_default.txt"

#: What modelopt 0.47 writes as ``exclude_modules`` for its single-format exports (SmoothQuant,
#: FP8, AWQ): every linear without an enabled quantizer, summarised — for Llama-family models
#: only the lm_head (``*lm_head*`` is disabled in all of modelopt's default configs).
MODELOPT_EXCLUDE_MODULES = ("lm_head",)

#: TensorRT-LLM's own default list (``tensorrt_llm/quantization/quantize.py: quantize_layers``,
#: used when ``exclude_modules`` is absent/null). Writing any list replaces it, so the weight-only
#: formats (which TensorRT-LLM, not modelopt, quantizes at build time) write it in full: with only
#: ``["lm_head"]`` the vocab embedding would become a WeightOnlyQuantEmbedding expecting int8 rows.
TRTLLM_DEFAULT_EXCLUDE_MODULES = (
    "*lm_head",
    "*router",
    "*vocab_embedding",
    "*position_embedding",
    "*block_embedding",
    "*shared_expert_gate",
)

SMOOTHQUANT = "W8A8_SQ_PER_CHANNEL"
#: TensorRT-LLM's plugin SmoothQuant formats (its own convert_checkpoint.py), by
#: (per-channel weights, per-token activations); see quantize/smoothquant.py.
SQ_PLUGIN_ALGOS = {
    (True, True): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    (True, False): "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    (False, True): "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    (False, False): "W8A8_SQ_PER_TENSOR_PLUGIN",
}
SQ_PLUGIN = tuple(SQ_PLUGIN_ALGOS.values())
#: --sq-recipe values: "trtllm" = the plugin formats above, "modelopt" = W8A8_SQ_PER_CHANNEL.
SQ_RECIPES = ("trtllm", "modelopt")
#: --awq-act values: the activations of an AWQ build (fp8: W4A8_AWQ; absent: W4A16_AWQ)
AWQ_ACTIVATIONS = ("fp8",)
FP8 = "FP8"
W8A16 = "W8A16"
W4A16 = "W4A16"
W4A16_AWQ = "W4A16_AWQ"
#: FP8 rowwise: fp8 weights per output channel, fp8 activations per token (dynamic); TensorRT-LLM's
#: convert_checkpoint.py --use_fp8_rowwise (quantize/recipes/fp8_rowwise/)
FP8_ROWWISE = "FP8_PER_CHANNEL_PER_TOKEN"
#: NVFP4: E2M1 weights in blocks of 16 with E4M3 block scales and a float32 global scale,
#: activations the same at run time from a calibrated global scale (quantize/recipes/nvfp4/)
NVFP4 = "NVFP4"
#: INT4 AWQ weights with FP8 (e4m3) activations: modelopt's W4A8_AWQ_BETA_CFG, ``--awq --awq-act fp8``
#: (quantize/recipes/w4a8_awq/)
W4A8_AWQ = "W4A8_AWQ"
WEIGHT_ONLY_ALGOS = (W8A16, W4A16)
#: quant_algo values whose tensors modelopt computes (calibration + extract_quant_state).
MODELOPT_ALGOS = (SMOOTHQUANT, FP8, W4A16_AWQ, NVFP4, W4A8_AWQ)
#: every quant_algo this project can write
ALL_ALGOS = (SMOOTHQUANT, *SQ_PLUGIN, FP8, W8A16, W4A16, W4A16_AWQ, FP8_ROWWISE, NVFP4, W4A8_AWQ)

KV_CACHE_DTYPES = {"int8": "INT8", "fp8": "FP8", "nvfp4": "NVFP4"}

# flag attribute -> (quant_algo, flag as typed)
WEIGHT_FLAGS = (
    ("smoothquant", SMOOTHQUANT, "--smoothquant"),
    ("fp8", FP8, "--fp8"),
    ("int8_weight_only", W8A16, "--int8-weight-only"),
    ("int4_weight_only", W4A16, "--int4-weight-only"),
    ("awq", W4A16_AWQ, "--awq"),
    ("fp8_rowwise", FP8_ROWWISE, "--fp8-rowwise"),
    ("nvfp4", NVFP4, "--nvfp4"),
)
