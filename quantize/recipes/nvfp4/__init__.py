"""NVFP4 (``--nvfp4``): modelopt 0.47's ``NVFP4_DEFAULT_CFG`` (``max`` algorithm) as its
``export_tensorrt_llm_checkpoint`` writes it for TensorRT-LLM 1.2's ``FP4Linear`` /
``FP4RowLinear`` (Blackwell, SM 100 and newer).

Weights: E2M1 (4-bit float) in blocks of 16 inputs, two per byte, each block with an E4M3 scale,
each linear with a float32 global scale (``weights_scaling_factor_2``); activations: a calibrated
float32 global scale (``activation_scaling_factor``), their E2M1 blocks and E4M3 scales computed
per token at run time. q/k/v and gate/up share their global scales (modelopt's
``preprocess_linear_fusion``: the max over the group; TensorRT-LLM's fused qkv GEMM and its
``alpha`` need one). The arithmetic is in weights.py.

Calibrated layer by layer like FP8 (quantize/max_layerwise.py: running maxima of every linear's
input and weight by forward hooks, the ``max`` calibrator's result); the tensors are extracted by
quantize/modelopt_state.py through :meth:`Nvfp4.export_linear`.
"""
from __future__ import annotations

from common.errors import UserError

from ...algos import MODELOPT_EXCLUDE_MODULES, NVFP4
from ..base import MAX, Recipe
from ..moe import MoeNvfp4
from ..parts import LinearExport, MemoryModel, UnifiedFormat

#: the block size (elements of a row per E4M3 scale): config.json's ``group_size``
BLOCK = 16
#: the families whose NVFP4 TensorRT-LLM checkpoint is written here (their tensors are tested
#: against modelopt 0.47's export, decoder types llama / qwen / gemma): the Llama family spec
#: (LlamaForCausalLM, MistralForCausalLM), Qwen2 (q/k/v bias: float, beside the FP4 qkv),
#: Qwen3 (q/k norms: float), Gemma 2 / 3 (tests/test_gemma_quant.py), Phi-3
#: (tests/test_phi3_quant.py) and Mixtral (its attention
#: is Llama's, its experts stacked as modelopt exports them: tests/test_moe_nvfp4.py).
#: TensorRT-LLM 1.2's ``fp4_quantize`` (quantization/quantize.py) swaps every ColumnLinear /
#: RowLinear for FP4Linear / FP4RowLinear whatever the model class, so the rule is "tested here",
#: not an upstream limit
ENGINE_FAMILIES = ("llama", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


class Nvfp4(Recipe):
    """E2M1 weights with E4M3 block scales (16) and a float32 global scale; activations alike."""

    quant_algo = NVFP4
    flag = "--nvfp4"
    exclude_modules = MODELOPT_EXCLUDE_MODULES
    weight_calibration = MAX
    max_linears = True
    #: 4-bit weights plus one E4M3 scale per 16 (0.5 + 1/16 bytes per weight); calibration as FP8's
    memory = MemoryModel(weight_bytes=0.5625, layer_factor=1.0, hooks=True)
    #: experts as modelopt's export stacks them (quantize/moe.py); the shapes TensorRT-LLM 1.2's
    #: NVFP4 MoE layer can load (MoeNvfp4.preflight)
    moe = MoeNvfp4()
    #: modelopt's unified NVFP4 (``export_hf_checkpoint``): per linear ``weight`` uint8
    #: [out, in/2], ``weight_scale`` E4M3 [out, in/16], 0-dim ``weight_scale_2`` / ``input_scale``,
    #: q/k/v and gate/up sharing their globals; layer by layer from the calibration store (the
    #: TensorRT-LLM form there holds the same block scales and globals, :meth:`unified_linear`)
    unified = UnifiedFormat(weight="nvfp4", fuse_shared_inputs=True, layerwise=True,
                            quantization_config_extra=(("config_groups", {"group_0": {
                                "input_activations": {"dynamic": False, "num_bits": 4,
                                                      "type": "float", "group_size": BLOCK},
                                "weights": {"dynamic": False, "num_bits": 4, "type": "float",
                                            "group_size": BLOCK},
                                "targets": ["Linear"]}}),))
    linear_export = LinearExport("nvfp4", (2, 1), ("qkv", "gate_up"),
                                 ("weight", "weights_scaling_factor", "activation_scaling_factor",
                                  "weights_scaling_factor_2"))

    def check_kv(self, kv: str | None) -> None:
        """An INT8 KV cache is refused; FP8 and NVFP4 (``--target pytorch``) KV caches pair."""
        if kv == "INT8":
            raise UserError("--nvfp4 with --kv-cache-dtype int8 is not supported: NVFP4 needs "
                            "Blackwell (SM 100) and TensorRT-LLM 1.2 refuses an INT8 KV cache there; "
                            "use --kv-cache-dtype fp8")

    def check_linear_shapes(self, spec, in_dims, out_dims, unpadded_in=None) -> None:
        """``FP4Linear`` / ``FP4RowLinear`` assert whole blocks of 16 inputs per rank
        (tensorrt_llm/quantization/layers.py: "Input features must be a multiple of 16")."""
        for name, k in {**in_dims, **(unpadded_in or {})}.items():
            if k % BLOCK:
                raise UserError(f"--nvfp4: {name} has {k} input features per rank, not a multiple "
                                f"of the NVFP4 block size {BLOCK} (TensorRT-LLM's FP4Linear asserts "
                                f"it); choose another --tp or format")

    def family_refusal(self, spec, family, target: str) -> str | None:
        proven = super().family_refusal(spec, family, target)
        if proven is None and target == "engine" and family.name not in ENGINE_FAMILIES:
            return (f"--nvfp4 engines are written for the Llama / Mistral, Mixtral, Qwen2, Qwen3, "
                    f"Gemma 2 / 3 and Phi-3 families only, not {family.architectures[0]}: its NVFP4 "
                    f"tensors are not tested against modelopt 0.47's export here; use --target "
                    f"pytorch, --fp8 or --awq")
        return proven

    def unified_store_entries(self, spec) -> tuple[bool, bool]:
        """No smoothing entries (the store's TensorRT-LLM form holds every NVFP4 scale the unified
        form needs); the raw k/v amax with a KV cache."""
        return False, spec.kv_cache_quant_algo is not None

    def _modelopt_weights(self, spec, mtq) -> dict:
        import copy

        return copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)

    def _block_extras(self, spec) -> dict:
        return {"group_size": BLOCK}

    def unified_linear(self, trtllm: dict, weight) -> dict:
        """One linear's unified tensors from its TensorRT-LLM ones (``export_linear``'s, or the
        calibration store's): the scales renamed, the weight re-encoded from ``weight`` in the
        checkpoint dtype (modelopt's ``_export_quantized_weight``: block scales from the weight
        as calibrated, E2M1 codes from ``weight.to(dtype)``)."""
        from .weights import quantize

        wsf2 = trtllm["weights_scaling_factor_2"].reshape(())
        out = {"weight": quantize(weight, trtllm["weights_scaling_factor"], wsf2),
               "weight_scale": trtllm["weights_scaling_factor"], "weight_scale_2": wsf2}
        if "activation_scaling_factor" in trtllm:
            out["input_scale"] = trtllm["activation_scaling_factor"].reshape(())
        return out

    def export_linear(self, weight, weight_amax, input_amax) -> dict:
        """One linear's tensors (modelopt's export): packed E2M1 ``weight`` uint8 [out, in/2],
        ``weights_scaling_factor`` E4M3 [out, in/16], the 0-dim float32 globals."""
        from .weights import export_linear

        return export_linear(weight, weight_amax, input_amax)
