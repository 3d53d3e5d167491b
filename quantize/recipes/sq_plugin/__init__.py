"""TensorRT-LLM's own SmoothQuant (its convert_checkpoint.py --smoothquant A [--per_channel]
[--per_token]): four plugin formats by (per-channel weights, per-token activations), calibrated by
forward range hooks layer by layer (quantize/sq_layerwise.py; smoothing and int8 in
quantize/smoothquant.py, quantize/sq_int8.py, alpha search in quantize/sq_search.py)."""
from __future__ import annotations

from common.errors import UserError

from ...algos import DEFAULT_SQ_PLUGIN_ALPHA
from ..base import SQ_HOOKS, Recipe
from ..parts import MemoryModel
from ..moe import SMOOTHQUANT_REFUSED


def check_smoothquant_tp(num_kv_heads: int, tp: int) -> None:
    """SmoothQuant with tp > num_kv_heads: per-channel k/v scales cannot be duplicated (modelopt
    0.47's ``build_qkv`` raises "Duplicating KV heads per-channel scales is not supported")."""
    if tp > num_kv_heads:
        raise UserError(f"--smoothquant with --tp {tp} needs at least {tp} KV heads (the model has "
                        f"{num_kv_heads}): per-channel k/v scales cannot be duplicated across ranks; "
                        f"use --tp {num_kv_heads} or less, or another format")


def check_alpha(alpha: float) -> float:
    if not (0.0 <= alpha <= 1.0):
        raise UserError(f"--smoothquant alpha must be in [0, 1], got {alpha}")
    return alpha


class SqPlugin(Recipe):
    unified = None  # TensorRT-LLM's own tensors: no modelopt unified form
    """One of TensorRT-LLM's W8A8_SQ_*_PLUGIN formats."""
    lora_refusal = ("TensorRT-LLM's SmoothQuant attention and MLP layers have no LoRA "
                    "branch (NVIDIA/TensorRT-LLM #2604)")

    flag = "--smoothquant"
    trtllm_plugin = True
    weight_calibration = SQ_HOOKS
    #: the layer's float32 weights only (smoothing and int8 rounding in cache-sized blocks) and no
    #: modelopt import (fitted: 8B-shaped, 4 x 64 tokens, CPU: 1.50 GB peak RSS)
    memory = MemoryModel(weight_bytes=1.0, layer_factor=1.0, hooks=True, cpu_smoothing=True)
    moe = SMOOTHQUANT_REFUSED
    kv_duplication = False  # per-channel k/v scales

    def __init__(self, quant_algo: str, per_channel: bool, per_token: bool):
        self.quant_algo, self.per_channel, self.per_token = quant_algo, per_channel, per_token

    def alpha(self, value, kv):
        if value == "auto":
            alpha, search = None, True
        else:
            alpha, search = check_alpha(DEFAULT_SQ_PLUGIN_ALPHA if value is None else float(value)), False
        if kv == "FP8":
            raise UserError("--kv-cache-dtype fp8 with TensorRT-LLM's SmoothQuant recipe: its converter "
                            "writes a placeholder FP8 KV scale of 1.0; use --kv-cache-dtype int8, or "
                            "--sq-recipe modelopt for a calibrated FP8 KV cache")
        return alpha, search

    def check_tp(self, spec, num_kv_heads: int, tp: int) -> None:
        check_smoothquant_tp(num_kv_heads, tp)

    def family_refusal(self, spec, family, target: str) -> str | None:
        # TensorRT-LLM's SmoothQuantAttention (quantization/layers.py) has no q/k norms, and its
        # Qwen converter smooths Qwen2 decoder layers only (models/qwen/convert.py,
        # smooth_qwen2_model): a Qwen3 (or Gemma 3) checkpoint of this format cannot be made or
        # run there
        proven = super().family_refusal(spec, family, target)  # Family.formats first
        if proven is None and family.qk_norms:
            return (f"{self.flag} (TensorRT-LLM's SmoothQuant plugin) is not supported for "
                    f"{family.architectures[0]}: TensorRT-LLM 1.2 has no SmoothQuant attention "
                    f"with q/k norms; use --smoothquant --sq-recipe modelopt or another format")
        return proven

    def modelopt_config(self, spec) -> None:
        return None  # calibrated with forward hooks (quantize/smoothquant.py), not modelopt

    def quantization_block(self, spec) -> dict:
        """TensorRT-LLM's QuantConfig fields, as its convert_checkpoint.py writes them."""
        return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": spec.kv_cache_quant_algo,
                "group_size": 128, "smoothquant_val": spec.smoothquant_alpha, "clamp_val": None,
                "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None}

    def _weight_label(self, spec) -> str:
        alpha = "auto" if spec.sq_alpha_search else f"{spec.smoothquant_alpha:g}"
        return f"{self.quant_algo} (alpha {alpha})"

    def words(self, spec) -> str:
        alpha = "searched per layer" if spec.sq_alpha_search else f"{spec.smoothquant_alpha:g}"
        return (f"TensorRT-LLM {self.quant_algo} (alpha {alpha}): int8 weights "
                f"{'per channel' if self.per_channel else 'per tensor'}, int8 activations "
                f"{'per token (dynamic)' if self.per_token else 'per tensor (static)'}")
