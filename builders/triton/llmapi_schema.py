"""What the LLM-API backend's model.yaml may contain, and its check."""
from __future__ import annotations

from common.errors import UserError

# --- model.yaml keys of the LLM-API backend -----------------------------------------------------
# NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/1/model.py reads model.yaml
# with yaml.safe_load; "triton_config" is read by the backend itself (auto_complete_config and
# initialize: "max_batch_size" and "decoupled" required, "cancellation_check_period_ms"
# optional; newer releases also read "multimodal"), and *every other top-level key* is passed on
# as LLM(**kwargs) through tensorrt_llm.llmapi.llm_utils.update_llm_args_with_extra_dict.
# Newer releases also take a top-level "logits_post_processors" mapping (see that model.yaml).
# LLM(**kwargs) validates against TorchLlmArgs, a pydantic model with extra="forbid": the set
# below is the fields of BaseLlmArgs + TorchLlmArgs in tensorrt_llm/llmapi/llm_args.py (1.0-era),
# plus ones trtllm-serve passes in 1.2 (tensorrt_llm/commands/serve.py get_llm_args), plus
# "backend" (deprecated but still a field, and what the upstream model.yaml sets).
LLMAPI_BACKEND_KEYS = frozenset({"triton_config", "logits_post_processors"})
LLMAPI_LLM_ARGS = frozenset({
    # BaseLlmArgs
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size",
    "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp", "cp_config",
    "load_format", "fail_fast_on_attention_window_too_large", "enable_lora", "lora_config",
    "kv_cache_config", "enable_chunked_prefill", "guided_decoding_backend",
    "batched_logits_processor", "iter_stats_max_iterations", "request_stats_max_iterations",
    "peft_cache_config", "scheduler_config", "cache_transceiver_config", "speculative_config",
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens",
    "gather_generation_logits", "num_postprocess_workers", "postprocess_tokenizer_dir",
    "reasoning_parser", "decoding_config", "backend",
    # TorchLlmArgs
    "build_config", "garbage_collection_gen0_threshold", "cuda_graph_config",
    "disable_overlap_scheduler", "moe_config", "attn_backend", "enable_mixed_sampler",
    "enable_trtllm_sampler", "enable_iter_perf_stats", "enable_iter_req_stats",
    "print_iter_log", "torch_compile_config", "enable_autotuner",
    "enable_layerwise_nvtx_marker", "enable_min_latency", "stream_interval",
    "force_dynamic_quantization", "allreduce_strategy", "checkpoint_loader",
    "checkpoint_format", "connector_config",
    # passed by trtllm-serve 1.2 (get_llm_args)
    "custom_tokenizer", "otlp_traces_endpoint",
})
LLMAPI_MODEL_YAML_KEYS = LLMAPI_LLM_ARGS | LLMAPI_BACKEND_KEYS
LLMAPI_TRITON_CONFIG_REQUIRED = frozenset({"max_batch_size", "decoupled"})
LLMAPI_TRITON_CONFIG_KEYS = LLMAPI_TRITON_CONFIG_REQUIRED | {"cancellation_check_period_ms",
                                                             "multimodal"}
# KvCacheConfig (same file) is a StrictBaseModel too: unknown keys are refused.
LLMAPI_KV_CACHE_CONFIG_KEYS = frozenset({
    "enable_block_reuse", "max_tokens", "max_attention_window", "sink_token_length",
    "free_gpu_memory_fraction", "host_cache_size", "onboard_blocks", "cross_kv_cache_fraction",
    "secondary_offload_min_priority", "event_buffer_max_size", "enable_partial_reuse",
    "copy_on_partial_reuse", "use_uvm", "dtype"})


def check_llmapi_model_yaml(data, where: str = "model.yaml", config=None) -> None:
    """Check a model.yaml dict against the keys the LLM-API backend and LLM(...) accept."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of LLM arguments + triton_config")
    unknown = sorted(set(data) - LLMAPI_MODEL_YAML_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}: neither a "
                        f"tensorrt_llm.LLM argument nor read by the backend")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise UserError(f"{where}: 'model' (the checkpoint path) is missing")
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        v = data.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{where}: {key} must be a whole number >= 1 (got {v!r})")
    kv = data.get("kv_cache_config")
    if kv is not None:
        if not isinstance(kv, dict):
            raise UserError(f"{where}: kv_cache_config must be a mapping")
        bad = sorted(set(kv) - LLMAPI_KV_CACHE_CONFIG_KEYS)
        if bad:
            raise UserError(f"{where}: kv_cache_config has unknown key(s) {', '.join(bad)}")
    tc = data.get("triton_config")
    if not isinstance(tc, dict):
        raise UserError(f"{where}: triton_config (max_batch_size, decoupled) is missing")
    missing = sorted(LLMAPI_TRITON_CONFIG_REQUIRED - set(tc))
    if missing:
        raise UserError(f"{where}: triton_config lacks {', '.join(missing)}")
    bad = sorted(set(tc) - LLMAPI_TRITON_CONFIG_KEYS)
    if bad:
        raise UserError(f"{where}: triton_config has unknown key(s) {', '.join(bad)}")
    if config is not None:
        if bool(tc["decoupled"]) != config.model_transaction_policy.decoupled:
            raise UserError(f"{where}: triton_config.decoupled ({tc['decoupled']}) differs from "
                            f"config.pbtxt's model_transaction_policy.decoupled")
        if int(tc["max_batch_size"]) != config.max_batch_size:
            raise UserError(f"{where}: triton_config.max_batch_size ({tc['max_batch_size']}) "
                            f"differs from config.pbtxt's max_batch_size ({config.max_batch_size})")


