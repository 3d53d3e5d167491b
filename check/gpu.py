"""GPU generations: names → SM (compute capability × 10), and what TensorRT-LLM 1.2's engine build
refuses on each. The one table of GPU facts in the project (issue 27's capability check extends it).

Rules (format × SM), with where they live:

- FP8 weights/activations (``FP8``) and an FP8 KV cache need SM ≥ 89 (Ada / Hopper and newer):
  NVIDIA's support matrix (``docs/source/reference/support-matrix.md``: FP8 on Ada, Hopper,
  Blackwell) and modelopt's; the FP8 GEMM / FMHA kernels exist from SM 89.
- FP8 mixture-of-experts needs SM ≥ 89 (``tensorrt_llm/builder.py`` ``build()``, as read by issue 28).
- SmoothQuant (``W8A8_SQ_*``), INT4 AWQ (``W4A16_AWQ``, ``W4A8_AWQ``) and an INT8 KV cache are
  refused on SM ≥ 100 (Blackwell) by TensorRT-LLM 1.2's ``build()`` (``tensorrt_llm/builder.py``, as
  read by issue 28; not re-read for this table: confirm on the release you build with).
- Weight-only INT8/INT4 (``W8A16``, ``W4A16``): quantized by trtllm-build for the build GPU, any SM.
- Multi-head latent attention (``DeepseekV2ForCausalLM``, whatever the format): TensorRT-LLM 1.2's
  MLA engine kernels are Hopper's (SM 90; the DeepSeek-V2 example of the engine flow,
  ``examples/models/contrib/deepseek_v2``, runs on Hopper only).
- NVFP4 needs SM >= 100 (Blackwell): the FP4 tensor-core GEMMs (``fp4_gemm``) exist from SM 100;
  NVIDIA's support matrix lists NVFP4 for Blackwell only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import UserError

#: lower-case names (spaces, dashes and underscores dropped) → SM
GPUS = {
    "v100": 70, "t4": 75, "a100": 80, "a30": 80, "a800": 80, "a10": 86, "a10g": 86, "a40": 86,
    "a6000": 86, "rtx3090": 86, "l4": 89, "l40": 89, "l40s": 89, "rtx4090": 89, "rtx6000ada": 89,
    "h100": 90, "h800": 90, "h200": 90, "h20": 90, "gh200": 90, "b200": 100, "b100": 100,
    "gb200": 100, "b300": 103, "gb300": 103, "rtx5090": 120, "rtxpro6000": 120,
}

_SQ = ("W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
       "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
       "W8A8_SQ_PER_TENSOR_PLUGIN")


@dataclass(frozen=True)
class GpuRule:
    field: str               # quant_algo, kv_cache_quant_algo, or moe_quant_algo (MoE models)
    values: tuple[str, ...]
    min_sm: int = 0
    below_sm: int = 10_000
    what: str = ""
    source: str = ""


RULES = (
    GpuRule("quant_algo", ("FP8",), min_sm=89, what="FP8 GEMMs need Ada / Hopper (SM 89) or newer",
            source="TensorRT-LLM support matrix; modelopt support matrix"),
    GpuRule("kv_cache_quant_algo", ("FP8",), min_sm=89,
            what="an FP8 KV cache needs Ada / Hopper (SM 89) or newer",
            source="TensorRT-LLM support matrix"),
    GpuRule("moe_quant_algo", ("FP8",), min_sm=89, what="FP8 mixture of experts needs SM 89 or newer",
            source="tensorrt_llm/builder.py build() (issue 28)"),
    GpuRule("quant_algo", ("NVFP4",), min_sm=100, what="NVFP4 GEMMs need Blackwell (SM 100) or "
            "newer", source="TensorRT-LLM support matrix (NVFP4: Blackwell); modelopt support "
            "matrix"),
    GpuRule("quant_algo", _SQ, below_sm=100, what="SmoothQuant (INT8) engines are refused on "
            "Blackwell (SM 100) and newer", source="tensorrt_llm/builder.py build() (issue 28)"),
    GpuRule("quant_algo", ("W4A16_AWQ", "W4A8_AWQ"), below_sm=100, what="INT4 AWQ engines are "
            "refused on Blackwell (SM 100) and newer", source="tensorrt_llm/builder.py build() "
            "(issue 28)"),
    GpuRule("kv_cache_quant_algo", ("INT8",), below_sm=100, what="an INT8 KV cache is refused on "
            "Blackwell (SM 100) and newer", source="tensorrt_llm/builder.py build() (issue 28)"),
    GpuRule("architecture", ("DeepseekV2ForCausalLM",), min_sm=90, what="multi-head latent "
            "attention (DeepSeek-V2) engines need TensorRT-LLM's MLA kernels: Hopper (SM 90)",
            source="examples/models/contrib/deepseek_v2 (Hopper); cpp/tensorrt_llm/kernels/"
            "mlaKernels.cu"),
)


def parse_gpu(text: str) -> tuple[str, int]:
    """(label, SM) of ``--gpu NAME|sm_XX``; ``UserError`` naming the known names otherwise."""
    key = re.sub(r"[\s_\-]", "", text.lower())
    m = re.fullmatch(r"(?:sm)?(\d{2,3})", key)
    if m:
        return f"sm_{m.group(1)}", int(m.group(1))
    if key in GPUS:
        return text, GPUS[key]
    raise UserError(f"--gpu {text!r}: unknown GPU; give sm_XX (e.g. sm_90) or one of "
                    f"{', '.join(sorted(GPUS))}")


def refusals(config: dict, sm: int) -> list[tuple[str, str]]:
    """(what, source) of every rule the checkpoint's format breaks on SM ``sm``."""
    q = config.get("quantization") or {}
    fields = {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
              "moe_quant_algo": q.get("quant_algo") if config.get("moe") else None,
              "architecture": config.get("architecture")}
    return [(r.what, r.source) for r in RULES
            if fields[r.field] in r.values and not r.min_sm <= sm < r.below_sm]
