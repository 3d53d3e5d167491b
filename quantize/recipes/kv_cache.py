"""What a quantized KV cache (``--kv-cache-dtype``) means to a build, by kv_cache_quant_algo:
one table per question, read by the base recipe (base.py), which handles a KV cache for every
weight format.

=========  ==========================================  =======================================
format     modelopt 0.47 (calibration, export)         TensorRT-LLM 1.2
=========  ==========================================  =======================================
INT8       FP8_KV_CFG's entries with num_bits 8        engines (not on Blackwell)
FP8        FP8_KV_CFG; TensorRT-LLM export clamps      engines and the PyTorch backend
           the scales to >= 1, the unified one not
NVFP4      NVFP4_KV_CFG: E2M1 in blocks of 16 along    the PyTorch backend only, beside FP8
           head_dim, dynamic E4M3 block scales; the    or NVFP4 linears (their
           unified ``k_scale`` / ``v_scale`` =         ``load_kv_scales``); Blackwell
           amax / 448, ``kv_cache_scheme`` "NVFP4"
=========  ==========================================  =======================================
"""
from __future__ import annotations

import copy

#: modelopt's ``num_bits`` of a KV cache's quantizers (FP8: e4m3, NVFP4: e2m1)
KV_CACHE_BITS = {"FP8": (4, 3), "INT8": 8, "NVFP4": (2, 1)}

#: the KV-cache scales' lower bound (modelopt clamps FP8 KV scales to >= 1 in its TensorRT-LLM
#: export)
KV_SCALE_FLOOR = {"FP8": 1.0}

#: --kv-cache-dtype values without a unified form (modelopt 0.47's unified export asserts
#: "Invalid KV cache quantization format" on INT8)
UNIFIED_KV_REFUSED = {
    "INT8": "--kv-cache-dtype int8 has no modelopt unified-checkpoint format (modelopt 0.47 exports "
            "FP8 KV-cache scales only); use --kv-cache-dtype fp8, or --target engine",
}

#: the mtq preset whose ``quant_cfg`` entries quantize the KV cache
_MODELOPT_PRESET = {"FP8": "FP8_KV_CFG", "NVFP4": "NVFP4_KV_CFG"}
#: entries written out where modelopt has no preset (INT8: FP8_KV_CFG's with 8 bits)
_MODELOPT_ENTRIES = {"INT8": [{"quantizer_name": "*[kv]_bmm_quantizer",
                               "cfg": {"num_bits": 8, "axis": None}}]}

#: config.json's ``quantization_config.kv_cache_scheme`` of the unified checkpoint (modelopt's
#: convert_hf_quant_config_format: FP8 as a scheme dict, NVFP4 by name)
KV_CACHE_SCHEME = {"FP8": {"dynamic": False, "num_bits": 8, "type": "float"}, "NVFP4": "NVFP4"}

#: elements per block along head_dim (an NVFP4 cache: modelopt's ``block_sizes {-1: 16}``,
#: TensorRT-LLM's E2M1 cache with its pool of block scales)
KV_HEAD_BLOCK = {"NVFP4": 16}

#: formats that pair only with the recipes that accept them in their ``check_kv`` (FP8 and
#: NVFP4), the refusal every other recipe gives. TensorRT-LLM 1.2's PyTorch backend (the one
#: target that takes an NVFP4 KV cache) loads the NVFP4 cache's K/V scales in its FP8 and NVFP4
#: linear methods only (tensorrt_llm/_torch/modules/linear.py, ``load_kv_scales`` of
#: FP8QDQLinearMethod and NVFP4LinearMethod: "used for NVFP4 KV cache")
KV_PAIRING_REFUSED = {
    "NVFP4": "--kv-cache-dtype nvfp4 pairs with --nvfp4 or --fp8 only, not {name}: TensorRT-LLM "
             "1.2's PyTorch backend loads NVFP4 KV-cache scales in its FP8 and NVFP4 linears only; "
             "add --nvfp4 or --fp8, or use --kv-cache-dtype fp8",
}


def kv_entries(kv: str | None) -> list:
    """modelopt ``quant_cfg`` entries of the KV cache ``kv`` (none: [])."""
    preset = _MODELOPT_PRESET.get(kv)
    if preset is None:
        return copy.deepcopy(_MODELOPT_ENTRIES.get(kv, []))
    import modelopt.torch.quantization as mtq

    return copy.deepcopy(getattr(mtq, preset)["quant_cfg"])


def head_refusal(kv: str | None, head_size: int) -> str | None:
    """Why a model with ``head_size`` cannot have the KV cache ``kv`` (None: it can)."""
    block = KV_HEAD_BLOCK.get(kv)
    if not block or head_size % block == 0:
        return None
    return (f"--kv-cache-dtype {kv.lower()} needs a head_dim that is a multiple of {block} (its "
            f"blocks of {block} along head_dim), this model has {head_size}; use "
            f"--kv-cache-dtype fp8")
