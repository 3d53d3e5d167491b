"""The quantization command-line flags (``add_quant_arguments``) and how the SmoothQuant ones pick a
recipe (``sq_algo``); :class:`quantize.formats.QuantSpec` validates what they give."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from common.errors import UserError

from .algos import (AWQ_ACTIVATIONS, AWQ_GROUP_SIZES, DEFAULT_AWQ_GROUP_SIZE, DEFAULT_CALIB_BATCH_SIZE, DEFAULT_CALIB_SEQ_LEN,
                    DEFAULT_CALIB_SIZE, DEFAULT_SMOOTHQUANT_ALPHA, DEFAULT_SQ_PLUGIN_ALPHA, KV_CACHE_DTYPES,
                    SMOOTHQUANT, SQ_PLUGIN_ALGOS, SQ_RECIPES)


def add_quant_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the quantization and calibration flags to ``parser`` (in their own argument group)."""
    g = parser.add_argument_group(
        "quantization",
        "At most one weight format; --kv-cache-dtype combines with any of them (except int8 with "
        "--fp8). SmoothQuant, FP8, AWQ and a quantized KV cache are calibrated with "
        "nvidia-modelopt on --calib-data.")
    _add_format_flags(g)
    _add_calibration_flags(g)
    return g


def _add_format_flags(g) -> None:
    """The weight formats (SmoothQuant with its recipe, FP8, weight-only, AWQ), the KV cache
    and the quality gate."""
    g.add_argument("--smoothquant", nargs="?", type=_alpha, const="default", default=None,
                   metavar="ALPHA|auto",
                   help="INT8 weights and activations (SmoothQuant). Default recipe: TensorRT-LLM's own "
                        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN (int8 weights per channel, int8 activations "
                        "per token, as convert_checkpoint.py --smoothquant A --per_channel --per_token "
                        f"writes it). ALPHA in [0, 1] is the migration strength (default {DEFAULT_SQ_PLUGIN_ALPHA}; "
                        f"{DEFAULT_SMOOTHQUANT_ALPHA} with --sq-recipe modelopt); 'auto' searches it per layer.")
    g.add_argument("--sq-recipe", choices=SQ_RECIPES, default=None,
                   help="trtllm (default): TensorRT-LLM's plugin SmoothQuant formats; modelopt: "
                        "nvidia-modelopt's W8A8_SQ_PER_CHANNEL (one static int8 scale per activation "
                        "tensor; the only SmoothQuant --target pytorch takes, and its default there).")
    g.add_argument("--sq-activations", choices=("token", "tensor"), default=None,
                   help="trtllm recipe: int8 activation scales per token (dynamic, default) or per tensor "
                        "(static, calibrated).")
    g.add_argument("--sq-weights", choices=("channel", "tensor"), default=None,
                   help="trtllm recipe: int8 weight scales per output channel (default) or per tensor "
                        "(qkv: one each for q, k and v).")
    g.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="quality gate of a calibrated run (always printed): exit 1, keeping no output, when "
                        "the checkpoint's perplexity on held-back calibration text exceeds the float "
                        "model's by more than PCT percent.")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 (e4m3) weights and activations, per-tensor scales (FP8; Ada/Hopper and newer).")
    g.add_argument("--int8-weight-only", action="store_true",
                   help="INT8 weight-only (W8A16); no calibration, trtllm-build quantizes the weights.")
    g.add_argument("--int4-weight-only", action="store_true",
                   help="INT4 weight-only, per channel (W4A16); no calibration, trtllm-build quantizes.")
    g.add_argument("--awq", action="store_true",
                   help="INT4 AWQ, group-wise weights with activation-aware scales (W4A16_AWQ).")
    g.add_argument("--awq-block-size", type=int, default=None, metavar="N",
                   help=f"AWQ group size, one of {', '.join(map(str, AWQ_GROUP_SIZES))} "
                        f"(default {DEFAULT_AWQ_GROUP_SIZE}).")
    g.add_argument("--awq-act", choices=AWQ_ACTIVATIONS, default=argparse.SUPPRESS, metavar="fp8",
                   help="with --awq: fp8 = FP8 (e4m3) activations with one static scale per linear "
                        "(W4A8_AWQ; Ada/Hopper, SM 89/90), as modelopt's W4A8_AWQ_BETA_CFG.")
    # default SUPPRESS: a run without the flag records no key for it in build.json's options
    g.add_argument("--fp8-rowwise", nargs="?", const="mlp", default=argparse.SUPPRESS, choices=("mlp", "meta"),
                   metavar="mlp|meta",
                   help="FP8 rowwise (FP8_PER_CHANNEL_PER_TOKEN; Ada/Hopper): fp8 weights per output channel, fp8 "
                        "activations per token (dynamic), no calibration; the MLP linears are quantized. "
                        "mlp (default): every layer's MLP; meta: Meta's Llama 3.1 recipe, also the first "
                        "and last layers unquantized.")
    g.add_argument("--nvfp4", action="store_true", default=argparse.SUPPRESS,
                   help="NVFP4 (Blackwell, SM 100+): E2M1 weights in blocks of 16 with FP8 block scales "
                        "and a global scale, activations the same at run time (calibrated global scale).")
    g.add_argument("--kv-cache-dtype", choices=sorted(KV_CACHE_DTYPES), default=None,
                   help="Quantize the KV cache (calibrated per-layer scales).")


def _add_calibration_flags(g) -> None:
    """What calibration runs on, where, and the store it fills or reuses."""
    g.add_argument("--calib-data", type=Path, default=None, metavar="FILE",
                   help="Plain UTF-8 text used for calibration (default: the shipped "
                        "quantize/data/calib_default.txt, public-domain Shakespeare).")
    g.add_argument("--calib-size", type=int, default=DEFAULT_CALIB_SIZE, metavar="N",
                   help=f"Number of calibration samples (default {DEFAULT_CALIB_SIZE}).")
    g.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN, metavar="N",
                   help=f"Tokens per calibration sample (default {DEFAULT_CALIB_SEQ_LEN}).")
    g.add_argument("--calib-device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="Where the layer-by-layer calibration runs (default auto: cuda when a GPU is "
                        "visible). Only one decoder layer and the calibration activations are held "
                        "there at a time; float32 on cpu, the model's fp16/bf16 on cuda.")
    g.add_argument("--calibration", type=Path, default=None, metavar="PATH",
                   help="Reuse the calibration/ directory of an earlier build (same model, "
                        "calibration text and quantization flags; any --tp/--pp/--target) instead "
                        "of calibrating again. Without it the calibration is saved in "
                        "OUTPUT/calibration/, and an interrupted one resumes from its last "
                        "finished layer when the same command is rerun. Dense models only (a "
                        "mixture-of-experts model is calibrated whole).")
    g.add_argument("--calib-batch-size", type=int, default=DEFAULT_CALIB_BATCH_SIZE, metavar="N",
                   help=f"Samples per forward pass during calibration (default {DEFAULT_CALIB_BATCH_SIZE}).")


def _alpha(text: str) -> float | str:
    if text in ("auto", "default"):  # "default": --smoothquant without a value (argparse converts const)
        return text
    try:
        a = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"SmoothQuant alpha must be a number in [0, 1] or 'auto', got {text!r}")
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise argparse.ArgumentTypeError(f"SmoothQuant alpha must be in [0, 1], got {text}")
    return a


def sq_algo(args) -> str:
    """quant_algo of --smoothquant with --sq-recipe / --sq-activations / --sq-weights (--target pytorch:
    modelopt's recipe, the only SmoothQuant of a unified checkpoint)."""
    if getattr(args, "awq_act", None) is not None:
        raise UserError("--awq-act applies to --awq; add it or drop the flag")
    recipe, acts, wts = (getattr(args, k, None) for k in ("sq_recipe", "sq_activations", "sq_weights"))
    pytorch = getattr(args, "target", "engine") == "pytorch"
    if pytorch and (recipe == "trtllm" or acts or wts):
        raise UserError("--target pytorch takes SmoothQuant only as --sq-recipe modelopt (W8A8_SQ_PER_CHANNEL); "
                        "TensorRT-LLM's plugin SmoothQuant formats are engine formats: use --target engine")
    if recipe == "modelopt" or (pytorch and recipe is None):
        if acts or wts:
            raise UserError("--sq-recipe modelopt is modelopt's W8A8_SQ_PER_CHANNEL (weights per channel, "
                            "activations per tensor): drop --sq-activations / --sq-weights")
        return SMOOTHQUANT
    return SQ_PLUGIN_ALGOS[(wts != "tensor", acts != "tensor")]
