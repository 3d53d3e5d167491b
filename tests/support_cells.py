"""The support grid's tests: which test proves each accepted (family, format, target) cell of
README's grid (tools/support_grid.py), and against what.

One line per (cell, test): ``T(family, format, target, oracle, node)``.
- family: examples/tiny.py's family (tools/support_grid.py ``ROWS``); format: a column id of
  tools/support_grid.py ``FORMATS`` ("float", "sq", "sq_modelopt", "fp8", "fp8_rowwise", "awq",
  "w4a8_awq", "nvfp4", "int8_wo", "int4_wo", "kv_int8", "kv_fp8", "nvfp4_kv_nvfp4"); target: "engine" / "pytorch".
- oracle: a key of ``ORACLES``: what the test compares our output with.
- node: a pytest node id under tests/ ("test_x.py::test_y" covers every parameter of it,
  "test_x.py::test_y[id]" one of them).
A weight format tested together with a KV cache (FP8 + FP8 KV) is listed under the weight
format and under the KV cache's column: both are compared.

tests/test_support_grid.py asserts: every cell the tool accepts has a line here, or is listed in
``UNTESTED`` with the reason; no line names a cell the tool refuses; every node id is collected by
pytest. To add a cell (a new family or format at merge): add its ``T(...)`` lines (and, for a new
family, its row in tools/support_grid.py ``ROWS``), then ``python tools/support_grid.py --write``.
"""
from __future__ import annotations

from typing import NamedTuple

#: oracle -> what it means (README's legend), strongest first
ORACLES = {
    "modelopt": "tensor for tensor equal to nvidia-modelopt 0.47's TensorRT-LLM export",
    "export_hf": "tensor for tensor equal to modelopt 0.47's export_hf_checkpoint",
    "formula": "equal to an independent restatement of TensorRT-LLM's formulas",
    "load-time": "the float checkpoint's bytes with the weight-only quant_algo (TensorRT-LLM "
                 "quantizes when it loads it)",
    "HF": "the CPU reference reader's logits equal HF's (float) or within the format's bound",
}
ORACLE_ORDER = tuple(ORACLES)


class T(NamedTuple):
    family: str
    fmt: str
    target: str
    oracle: str
    node: str


QC = "test_quantize_convert.py::"
PT = "test_pytorch_target.py::"
GC = "test_grid_cells.py::"

TESTS = (
    # --- Llama (engine) ---
    T("llama", "float", "engine", "modelopt", "test_convert_vs_modelopt.py::test_fp16_matches_modelopt_export"),
    T("llama", "float", "engine", "HF", "test_convert_logits.py::test_llama_fp32_logits"),
    T("llama", "sq", "engine", "formula", "test_smoothquant_plugin.py::test_plugin_variant_equals_trtllm_formulas"),
    T("llama", "sq", "engine", "formula", "test_sq_plugin_layerwise.py::test_plugin_variants_layerwise_equal_whole_model"),
    T("llama", "sq_modelopt", "engine", "modelopt", QC + "test_calibrated_checkpoint_equals_modelopt_export[sq]"),
    T("llama", "fp8", "engine", "modelopt", QC + "test_calibrated_checkpoint_equals_modelopt_export[fp8_kv_fp8]"),
    T("llama", "fp8_rowwise", "engine", "formula", "test_fp8_rowwise.py::test_tensors_equal_trtllm_restatement"),
    T("llama", "fp8_rowwise", "engine", "HF", "test_fp8_rowwise.py::test_reader_logits_close_to_hf"),
    T("llama", "awq", "engine", "modelopt", QC + "test_calibrated_checkpoint_equals_modelopt_export[awq128]"),
    T("llama", "w4a8_awq", "engine", "modelopt", "test_w4a8_awq.py::test_w4a8_checkpoint_equals_modelopt_export"),
    T("llama", "nvfp4", "engine", "modelopt", "test_nvfp4.py::test_nvfp4_checkpoint_equals_modelopt_export"),
    T("llama", "int8_wo", "engine", "modelopt", QC + "test_weight_only_with_kv_cache_is_float_weights_plus_modelopt_kv_scales[W8A16]"),
    T("llama", "int8_wo", "engine", "formula", "test_reference_quant.py::test_weight_only_equals_hand_fake_quant"),
    T("llama", "int8_wo", "engine", "load-time", QC + "test_weight_only_is_the_float_checkpoint_with_its_quant_algo[--int8-weight-only-W8A16]"),
    T("llama", "int4_wo", "engine", "modelopt", QC + "test_weight_only_with_kv_cache_is_float_weights_plus_modelopt_kv_scales[W4A16]"),
    T("llama", "int4_wo", "engine", "formula", "test_reference_quant.py::test_weight_only_equals_hand_fake_quant"),
    T("llama", "int4_wo", "engine", "load-time", QC + "test_weight_only_is_the_float_checkpoint_with_its_quant_algo[--int4-weight-only-W4A16]"),
    T("llama", "kv_int8", "engine", "modelopt", QC + "test_calibrated_checkpoint_equals_modelopt_export[kv_int8_only]"),
    T("llama", "kv_fp8", "engine", "modelopt", QC + "test_calibrated_checkpoint_equals_modelopt_export[fp8_kv_fp8]"),
    # --- Llama (pytorch) ---
    T("llama", "float", "pytorch", "export_hf", PT + "test_unquantized_is_the_source_weights"),
    T("llama", "sq", "pytorch", "export_hf", PT + "test_cli_target_pytorch_smoothquant_is_modelopts_recipe_and_gated"),
    T("llama", "sq", "pytorch", "export_hf", PT + "test_unified_checkpoint_matches_modelopt_export[W8A8_SQ_PER_CHANNEL-None-kw0-overrides0]"),
    T("llama", "sq_modelopt", "pytorch", "export_hf", PT + "test_unified_checkpoint_matches_modelopt_export[W8A8_SQ_PER_CHANNEL-None-kw0-overrides0]"),
    T("llama", "fp8", "pytorch", "export_hf", PT + "test_unified_checkpoint_matches_modelopt_export[FP8-fp8-kw1-overrides1]"),
    T("llama", "fp8", "pytorch", "export_hf", PT + "test_from_the_calibration_store_matches_modelopt_export[FP8-None-kw0-overrides0]"),
    T("llama", "awq", "pytorch", "export_hf", PT + "test_unified_checkpoint_matches_modelopt_export[W4A16_AWQ-None-kw2-overrides2]"),
    T("llama", "w4a8_awq", "pytorch", "export_hf", "test_w4a8_awq.py::test_unified_checkpoint_equals_modelopt_export_hf_checkpoint"),
    T("llama", "nvfp4", "pytorch", "export_hf", "test_nvfp4.py::test_unified_checkpoint_equals_export_hf_checkpoint"),
    T("llama", "int8_wo", "pytorch", "export_hf", PT + "test_weight_only_int8_streams_and_matches_modelopt"),
    T("llama", "kv_fp8", "pytorch", "export_hf", PT + "test_unified_checkpoint_matches_modelopt_export[None-fp8-kw4-overrides4]"),
    # --- Mistral ---
    T("mistral", "float", "engine", "modelopt", "test_convert_vs_modelopt.py::test_fp16_matches_modelopt_export[mistral-2-2-1000-False]"),
    T("mistral", "float", "engine", "HF", "test_convert_logits.py::test_other_families_fp32_and_fp16[mistral]"),
    T("mistral", "sq_modelopt", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_sq_kv_int8]"),
    T("mistral", "kv_int8", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_sq_kv_int8]"),
    T("mistral", "fp8", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_fp8_kv_fp8]"),
    T("mistral", "kv_fp8", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_fp8_kv_fp8]"),
    T("mistral", "awq", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_awq128]"),
    T("mistral", "nvfp4", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_nvfp4]"),
    T("mistral", "int8_wo", "engine", "load-time", GC + "test_engine_weight_only_is_the_float_checkpoint[mistral]"),
    T("mistral", "int4_wo", "engine", "load-time", GC + "test_engine_weight_only_is_the_float_checkpoint[mistral]"),
    T("mistral", "float", "pytorch", "export_hf", GC + "test_pytorch_float_and_int8_weight_only_equal_export_hf_checkpoint[mistral]"),
    T("mistral", "int8_wo", "pytorch", "export_hf", GC + "test_pytorch_float_and_int8_weight_only_equal_export_hf_checkpoint[mistral]"),
    T("mistral", "sq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_sq]"),
    T("mistral", "sq_modelopt", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_sq]"),
    T("mistral", "fp8", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_fp8_kv_fp8]"),
    T("mistral", "kv_fp8", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_fp8_kv_fp8]"),
    T("mistral", "awq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_awq]"),
    T("mistral", "sq", "engine", "formula", GC + "test_mistral_smoothquant_plugin_equals_trtllm_formulas"),
    T("mistral", "fp8_rowwise", "engine", "formula", GC + "test_fp8_rowwise_equals_trtllm_restatement[mistral]"),
    T("mistral", "w4a8_awq", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[mistral_w4a8]"),
    T("mistral", "w4a8_awq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_w4a8]"),
    T("mistral", "nvfp4", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_nvfp4_kv_nvfp4]"),
    # --- Qwen2 ---
    T("qwen2", "float", "engine", "modelopt", "test_convert_vs_modelopt.py::test_fp16_matches_modelopt_export[qwen2-2-2-1000-False]"),
    T("qwen2", "float", "engine", "HF", "test_convert_logits.py::test_other_families_fp32_and_fp16[qwen2]"),
    T("qwen2", "sq", "engine", "formula", "test_smoothquant_plugin.py::test_mha_qkv_and_int8_kv_cache_equal_trtllm_formulas"),
    T("qwen2", "sq", "engine", "formula", "test_sq_plugin_layerwise.py::test_auto_and_int8_kv_cache_layerwise_equal_whole_model[qwen2-W8A8_SQ_PER_TENSOR_PLUGIN-0.8-heads1]"),
    T("qwen2", "sq_modelopt", "engine", "modelopt", QC + "test_qwen2_with_qkv_bias_equals_modelopt_export[sq_kv_int8]"),
    T("qwen2", "awq", "engine", "modelopt", QC + "test_qwen2_with_qkv_bias_equals_modelopt_export[awq128_kv_fp8]"),
    T("qwen2", "kv_int8", "engine", "modelopt", QC + "test_qwen2_with_qkv_bias_equals_modelopt_export[sq_kv_int8]"),
    T("qwen2", "kv_fp8", "engine", "modelopt", QC + "test_qwen2_with_qkv_bias_equals_modelopt_export[awq128_kv_fp8]"),
    T("qwen2", "fp8", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[qwen2_fp8]"),
    T("qwen2", "int8_wo", "engine", "load-time", GC + "test_engine_weight_only_is_the_float_checkpoint[qwen2]"),
    T("qwen2", "int4_wo", "engine", "load-time", GC + "test_engine_weight_only_is_the_float_checkpoint[qwen2]"),
    T("qwen2", "float", "pytorch", "export_hf", GC + "test_pytorch_float_and_int8_weight_only_equal_export_hf_checkpoint[qwen2]"),
    T("qwen2", "int8_wo", "pytorch", "export_hf", GC + "test_pytorch_float_and_int8_weight_only_equal_export_hf_checkpoint[qwen2]"),
    T("qwen2", "sq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_sq]"),
    T("qwen2", "sq_modelopt", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_sq]"),
    T("qwen2", "fp8", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_fp8_kv_fp8]"),
    T("qwen2", "kv_fp8", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_fp8_kv_fp8]"),
    T("qwen2", "awq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_awq]"),
    T("qwen2", "fp8_rowwise", "engine", "formula", GC + "test_fp8_rowwise_equals_trtllm_restatement[qwen2]"),
    T("qwen2", "w4a8_awq", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[qwen2_w4a8]"),
    T("qwen2", "w4a8_awq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_w4a8]"),
    T("qwen2", "nvfp4", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_nvfp4_kv_nvfp4]"),
    # --- Qwen3 ---
    T("qwen3", "float", "engine", "modelopt", "test_qwen3.py::test_float_equals_modelopt_export"),
    T("qwen3", "float", "engine", "HF", "test_qwen3.py::test_fp32_logits_equal_hf"),
    T("qwen3", "sq_modelopt", "engine", "modelopt", "test_qwen3.py::test_calibrated_equals_modelopt_export[sq_kv_int8]"),
    T("qwen3", "fp8", "engine", "modelopt", "test_qwen3.py::test_calibrated_equals_modelopt_export[fp8_kv_fp8]"),
    T("qwen3", "awq", "engine", "modelopt", "test_qwen3.py::test_calibrated_equals_modelopt_export[awq128]"),
    T("qwen3", "int8_wo", "engine", "load-time", "test_qwen3.py::test_weight_only_is_the_float_checkpoint[--int8-weight-only-W8A16]"),
    T("qwen3", "int4_wo", "engine", "load-time", "test_qwen3.py::test_weight_only_is_the_float_checkpoint[--int4-weight-only-W4A16]"),
    T("qwen3", "kv_int8", "engine", "modelopt", "test_qwen3.py::test_calibrated_equals_modelopt_export[kv_int8_only]"),
    T("qwen3", "kv_fp8", "engine", "modelopt", "test_qwen3.py::test_calibrated_equals_modelopt_export[fp8_kv_fp8]"),
    T("qwen3", "float", "pytorch", "export_hf", "test_qwen3.py::test_unified_checkpoint_equals_modelopt_export[float]"),
    T("qwen3", "sq", "pytorch", "export_hf", "test_qwen3.py::test_unified_checkpoint_equals_modelopt_export[sq]"),
    T("qwen3", "sq_modelopt", "pytorch", "export_hf", "test_qwen3.py::test_unified_checkpoint_equals_modelopt_export[sq]"),
    T("qwen3", "fp8", "pytorch", "export_hf", "test_qwen3.py::test_unified_checkpoint_equals_modelopt_export[fp8_kv_fp8]"),
    T("qwen3", "awq", "pytorch", "export_hf", "test_qwen3.py::test_unified_checkpoint_equals_modelopt_export[awq]"),
    T("qwen3", "int8_wo", "pytorch", "export_hf", "test_qwen3.py::test_unified_weight_only_int8_equals_modelopt"),
    T("qwen3", "kv_fp8", "pytorch", "export_hf", "test_qwen3.py::test_unified_checkpoint_equals_modelopt_export[kv_fp8_only]"),
    T("qwen3", "fp8_rowwise", "engine", "formula", GC + "test_fp8_rowwise_equals_trtllm_restatement[qwen3]"),
    T("qwen3", "w4a8_awq", "engine", "modelopt", GC + "test_engine_cell_equals_modelopt_export[qwen3_w4a8]"),
    T("qwen3", "w4a8_awq", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen3_w4a8]"),
    T("qwen3", "nvfp4", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen3_nvfp4_kv_nvfp4]"),
    # --- Gemma 2 / Gemma 3 ---
    T("gemma2", "float", "engine", "HF", "test_gemma.py::test_float_logits_equal_hf[gemma2-2-1]"),
    T("gemma2", "fp8", "engine", "modelopt", "test_gemma.py::test_calibrated_checkpoint_equals_modelopt_tensors[gemma2-FP8-fp8]"),
    T("gemma2", "kv_fp8", "engine", "modelopt", "test_gemma.py::test_calibrated_checkpoint_equals_modelopt_tensors[gemma2-FP8-fp8]"),
    T("gemma2", "sq_modelopt", "engine", "modelopt", GC + "test_gemma2_smoothquant_int8_kv_equals_modelopt_export"),
    T("gemma2", "kv_int8", "engine", "modelopt", GC + "test_gemma2_smoothquant_int8_kv_equals_modelopt_export"),
    T("gemma2", "int8_wo", "engine", "load-time", GC + "test_engine_weight_only_is_the_float_checkpoint[gemma2]"),
    T("gemma2", "int4_wo", "engine", "load-time", GC + "test_engine_weight_only_is_the_float_checkpoint[gemma2]"),
    T("gemma2", "float", "pytorch", "export_hf", "test_gemma.py::test_pytorch_target_equals_modelopt_export[gemma2]"),
    T("gemma2", "int8_wo", "pytorch", "export_hf", "test_gemma.py::test_pytorch_target_equals_modelopt_export[gemma2]"),
    T("gemma3", "float", "engine", "HF", "test_gemma.py::test_float_logits_equal_hf[gemma3-1-1]"),
    T("gemma3", "float", "engine", "formula", "test_gemma.py::test_checkpoint_as_trtllm_gemma_converter_writes_it"),
    T("gemma3", "sq_modelopt", "engine", "modelopt", "test_gemma.py::test_calibrated_checkpoint_equals_modelopt_tensors[gemma3-W8A8_SQ_PER_CHANNEL-int8]"),
    T("gemma3", "fp8", "engine", "modelopt", "test_gemma.py::test_calibrated_checkpoint_equals_modelopt_tensors[gemma3-FP8-fp8]"),
    T("gemma3", "int8_wo", "engine", "load-time", "test_gemma.py::test_engine_weight_only_is_the_float_checkpoint_with_its_quant_algo[--int8-weight-only-W8A16]"),
    T("gemma3", "int4_wo", "engine", "load-time", "test_gemma.py::test_engine_weight_only_is_the_float_checkpoint_with_its_quant_algo[--int4-weight-only-W4A16]"),
    T("gemma3", "kv_int8", "engine", "modelopt", "test_gemma.py::test_calibrated_checkpoint_equals_modelopt_tensors[gemma3-W8A8_SQ_PER_CHANNEL-int8]"),
    T("gemma3", "kv_fp8", "engine", "modelopt", "test_gemma.py::test_calibrated_checkpoint_equals_modelopt_tensors[gemma3-FP8-fp8]"),
    T("gemma3", "float", "pytorch", "export_hf", "test_gemma.py::test_pytorch_target_equals_modelopt_export[gemma3]"),
    T("gemma3", "int8_wo", "pytorch", "export_hf", "test_gemma.py::test_pytorch_target_equals_modelopt_export[gemma3]"),
    # --- Phi-3 ---
    T("phi3", "float", "engine", "modelopt", "test_phi3.py::test_tp1_equals_modelopt_export"),
    T("phi3", "float", "engine", "HF", "test_phi3.py::test_fp32_logits_equal_hf"),
    T("phi3", "int8_wo", "engine", "load-time", "test_phi3.py::test_weight_only_is_the_float_checkpoint[--int8-weight-only-W8A16]"),
    T("phi3", "int4_wo", "engine", "load-time", "test_phi3.py::test_weight_only_is_the_float_checkpoint[--int4-weight-only-W4A16]"),
    T("phi3", "kv_int8", "engine", "modelopt", "test_phi3.py::test_kv_cache_scales_equal_modelopt_export[int8]"),
    T("phi3", "kv_fp8", "engine", "modelopt", "test_phi3.py::test_kv_cache_scales_equal_modelopt_export[fp8]"),
    T("phi3", "float", "pytorch", "export_hf", "test_phi3.py::test_pytorch_target_float_equals_modelopt_export"),
    # --- Mixtral ---
    T("mixtral", "float", "engine", "modelopt", "test_moe.py::test_float_equals_modelopt_export"),
    T("mixtral", "float", "engine", "HF", "test_moe.py::test_reader_logits_equal_hf"),
    T("mixtral", "fp8", "engine", "modelopt", "test_moe_quant.py::test_quantized_equals_modelopt_export[fp8_kv_fp8]"),
    T("mixtral", "awq", "engine", "modelopt", "test_moe_quant.py::test_quantized_equals_modelopt_export[awq128_kv_int8]"),
    T("mixtral", "int8_wo", "engine", "modelopt", "test_moe_quant.py::test_quantized_equals_modelopt_export[w8a16_kv_int8]"),
    T("mixtral", "int4_wo", "engine", "modelopt", "test_moe_quant.py::test_quantized_equals_modelopt_export[w4a16]"),
    T("mixtral", "kv_int8", "engine", "modelopt", "test_moe_quant.py::test_quantized_equals_modelopt_export[w8a16_kv_int8]"),
    T("mixtral", "kv_fp8", "engine", "modelopt", "test_moe_quant.py::test_quantized_equals_modelopt_export[fp8_kv_fp8]"),
    T("mixtral", "float", "pytorch", "export_hf", "test_moe.py::test_target_pytorch_equals_modelopt_unified_export"),
    # --- Qwen2-MoE / Qwen3-MoE ---
    T("qwen2_moe", "float", "engine", "modelopt", "test_qwen_moe.py::test_float_equals_modelopt_export[1-qwen2_moe]"),
    T("qwen2_moe", "float", "engine", "HF", "test_qwen_moe.py::test_fp32_logits_equal_hf[1-1-None-None-qwen2_moe]"),
    T("qwen2_moe", "fp8", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q2_fp8]"),
    T("qwen2_moe", "int8_wo", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q2_w8a16_kv_int8]"),
    T("qwen2_moe", "kv_int8", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q2_w8a16_kv_int8]"),
    T("qwen2_moe", "kv_fp8", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q2_kv_fp8]"),
    T("qwen2_moe", "int4_wo", "engine", "modelopt", GC + "test_moe_weight_only_cell_equals_modelopt_export[q2_w4a16]"),
    T("qwen2_moe", "float", "pytorch", "export_hf", "test_qwen_moe.py::test_target_pytorch_equals_modelopt_unified_export[qwen2_moe]"),
    T("qwen3_moe", "float", "engine", "modelopt", "test_qwen_moe.py::test_float_equals_modelopt_export[1-qwen3_moe]"),
    T("qwen3_moe", "float", "engine", "HF", "test_qwen_moe.py::test_fp32_logits_equal_hf[1-1-None-None-qwen3_moe]"),
    T("qwen3_moe", "fp8", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q3_fp8_kv_fp8]"),
    T("qwen3_moe", "int4_wo", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q3_w4a16]"),
    T("qwen3_moe", "kv_fp8", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q3_fp8_kv_fp8]"),
    T("qwen3_moe", "int8_wo", "engine", "modelopt", GC + "test_moe_weight_only_cell_equals_modelopt_export[q3_w8a16_kv_int8]"),
    T("qwen3_moe", "kv_int8", "engine", "modelopt", GC + "test_moe_weight_only_cell_equals_modelopt_export[q3_w8a16_kv_int8]"),
    T("qwen3_moe", "float", "pytorch", "export_hf", "test_qwen_moe.py::test_target_pytorch_equals_modelopt_unified_export[qwen3_moe]"),
    # --- DeepSeek-V2 ---
    T("deepseek_v2", "float", "engine", "HF", "test_deepseek_v2.py::test_fp32_logits_equal_hf_on_both_mla_paths"),
    T("deepseek_v2", "int8_wo", "engine", "formula", "test_deepseek_v2.py::test_weight_only_reader_equals_independent_dequantization[--int8-weight-only-W8A16-8-lite]"),
    T("deepseek_v2", "int4_wo", "engine", "formula", "test_deepseek_v2.py::test_weight_only_reader_equals_independent_dequantization[--int4-weight-only-W4A16-4-lite]"),
    # --- moeq (merge): Qwen-MoE AWQ, Mixtral NVFP4 ---
    T("qwen2_moe", "awq", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q2_awq128_kv_int8]"),
    T("qwen3_moe", "awq", "engine", "modelopt", "test_qwen_moe_quant.py::test_quantized_equals_modelopt_export[q3_awq128]"),
    T("mixtral", "nvfp4", "engine", "modelopt", "test_moe_nvfp4.py::test_nvfp4_equals_modelopt_export_at_every_moe_layout"),
    # --- nvfp4x (merge): NVFP4 for Mistral / Qwen2 / Qwen3, the NVFP4 KV cache ---
    T("mistral", "nvfp4", "engine", "modelopt", "test_nvfp4_families.py::test_engine_checkpoint_equals_modelopt_export[mistral-fp8-tps2]"),
    T("qwen2", "nvfp4", "engine", "modelopt", "test_nvfp4_families.py::test_engine_checkpoint_equals_modelopt_export[qwen2-None-tps0]"),
    T("qwen3", "nvfp4", "engine", "modelopt", "test_nvfp4_families.py::test_engine_checkpoint_equals_modelopt_export[qwen3-None-tps1]"),
    T("llama", "nvfp4_kv_nvfp4", "pytorch", "export_hf", "test_nvfp4_kv.py::test_unified_checkpoint_equals_export_hf_checkpoint[NVFP4]"),
    T("mistral", "nvfp4_kv_nvfp4", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[mistral_nvfp4_kv_nvfp4]"),
    T("qwen2", "nvfp4_kv_nvfp4", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen2_nvfp4_kv_nvfp4]"),
    T("qwen3", "nvfp4_kv_nvfp4", "pytorch", "export_hf", GC + "test_pytorch_cell_equals_export_hf_checkpoint[qwen3_nvfp4_kv_nvfp4]"),
    # --- moept (merge): quantized --target pytorch for mixture-of-experts ---
    T("mixtral", "fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[mixtral_fp8_kv_fp8]"),
    T("mixtral", "kv_fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[mixtral_fp8_kv_fp8]"),
    T("mixtral", "kv_fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[mixtral_kv_fp8]"),
    T("mixtral", "int8_wo", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[mixtral_w8a16]"),
    T("mixtral", "awq", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[mixtral_awq64]"),
    T("qwen2_moe", "fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[q2_fp8_kv_fp8]"),
    T("qwen2_moe", "kv_fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[q2_fp8_kv_fp8]"),
    T("qwen3_moe", "int8_wo", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[q3_w8a16]"),
    T("qwen2_moe", "int8_wo", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[q2_w8a16]"),
    T("qwen3_moe", "fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[q3_fp8_kv_fp8]"),
    T("qwen3_moe", "kv_fp8", "pytorch", "export_hf", "test_moe_pytorch_target.py::test_unified_equals_modelopt_export[q3_fp8_kv_fp8]"),
    # --- gemmaq (merge): Gemma AWQ / W4A8 / NVFP4, --target pytorch formats ---
    T("gemma3", "awq", "engine", "modelopt", "test_gemma_quant.py::test_awq_equals_modelopt_export_and_reads_as_its_fake_quant[gemma3-W4A16_AWQ-64-2-0.02]"),
    T("gemma2", "awq", "engine", "modelopt", "test_gemma_quant.py::test_awq_equals_modelopt_export_and_reads_as_its_fake_quant[gemma2-W4A16_AWQ-64-2-0.02]"),
    T("gemma3", "w4a8_awq", "engine", "modelopt", "test_gemma_quant.py::test_awq_equals_modelopt_export_and_reads_as_its_fake_quant[gemma3-W4A8_AWQ-128-1-0.45]"),
    T("gemma3", "nvfp4", "engine", "modelopt", "test_gemma_quant.py::test_nvfp4_equals_modelopt_export[gemma3-None-2]"),
    T("gemma2", "nvfp4", "engine", "modelopt", "test_gemma_quant.py::test_nvfp4_equals_modelopt_export[gemma2-None-1]"),
    T("gemma3", "fp8", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma3-FP8-fp8]"),
    T("gemma3", "kv_fp8", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma3-None-fp8]"),
    T("gemma3", "awq", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma3-W4A16_AWQ-None]"),
    T("gemma2", "awq", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma2-W4A16_AWQ-None]"),
    T("gemma3", "sq_modelopt", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma3-W8A8_SQ_PER_CHANNEL-None]"),
    T("gemma3", "sq", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma3-W8A8_SQ_PER_CHANNEL-None]"),
    T("gemma3", "nvfp4", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma3-NVFP4-None]"),
    # --- phi3q (merge): Phi-3 calibrated formats ---
    T("phi3", "fp8", "engine", "modelopt", "test_phi3_quant.py::test_calibrated_equals_modelopt_and_runs[fp8_kv_fp8]"),
    T("phi3", "kv_fp8", "engine", "modelopt", "test_phi3_quant.py::test_calibrated_equals_modelopt_and_runs[fp8_kv_fp8]"),
    T("phi3", "awq", "engine", "modelopt", "test_phi3_quant.py::test_calibrated_equals_modelopt_and_runs[awq128]"),
    T("phi3", "w4a8_awq", "engine", "modelopt", "test_phi3_quant.py::test_calibrated_equals_modelopt_and_runs[w4a8_awq]"),
    T("phi3", "nvfp4", "engine", "modelopt", "test_phi3_quant.py::test_calibrated_equals_modelopt_and_runs[nvfp4_kv_fp8]"),
    T("phi3", "fp8", "pytorch", "export_hf", "test_phi3_quant.py::test_unified_equals_modelopt_export[fp8]"),
    T("phi3", "kv_fp8", "pytorch", "export_hf", "test_phi3_quant.py::test_unified_equals_modelopt_export[kv_fp8_only]"),
    T("phi3", "awq", "pytorch", "export_hf", "test_phi3_quant.py::test_unified_equals_modelopt_export[awq]"),
    T("phi3", "nvfp4", "pytorch", "export_hf", "test_phi3_quant.py::test_unified_equals_modelopt_export[nvfp4]"),
    T("phi3", "int8_wo", "pytorch", "export_hf", "test_phi3_quant.py::test_unified_weight_only_int8_equals_modelopt"),
    T("gemma2", "w4a8_awq", "engine", "modelopt", "test_gemma_quant.py::test_awq_equals_modelopt_export_and_reads_as_its_fake_quant[gemma2-W4A8_AWQ-128-1-0.45]"),
    T("gemma2", "fp8", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma2-FP8-fp8]"),
    T("gemma2", "kv_fp8", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma2-FP8-fp8]"),
    T("gemma2", "sq", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma2-W8A8_SQ_PER_CHANNEL-None]"),
    T("gemma2", "sq_modelopt", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma2-W8A8_SQ_PER_CHANNEL-None]"),
    T("gemma2", "nvfp4", "pytorch", "export_hf", "test_gemma_quant.py::test_unified_equals_export_hf_checkpoint[gemma2-NVFP4-None]"),
    # --- DeepSeek-V3 ---
    T("deepseek_v3", "float", "pytorch", "export_hf", "test_deepseek_v3.py::test_float_unified_equals_modelopt_export"),
)

#: accepted cells without a test of their own, each with why it is believed to work: README shows
#: them as "untested" (tests/test_support_grid.py fails on an entry whose cell has a test or is
#: refused).
UNTESTED: dict[tuple[str, str, str], str] = {}


def by_cell() -> dict[tuple[str, str, str], tuple[T, ...]]:
    """(family, format, target) -> its tests."""
    out: dict = {}
    for t in TESTS:
        key = (t.family, t.fmt, t.target)
        out[key] = out.get(key, ()) + (t,)
    return out
