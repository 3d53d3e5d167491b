"""The Triton repository of a LoRA engine (``build_engine --lora``): the request tensors in the
engine's dtype, the ensemble / BLS inputs that carry them, and the ``lora_cache_*`` parameters of
the tensorrtllm backend sized from the adapters.

The backend's parameters (tensorrtllm_backend inflight_batcher_llm/src/model_instance_state.cc,
``getPeftCacheConfigFromParams``): ``lora_cache_optimal_adapter_size`` and
``lora_cache_max_adapter_size`` (ranks: the cache's page width follows the optimal one, a larger
rank is refused), ``lora_cache_host_memory_bytes``, ``lora_cache_gpu_memory_fraction``. A request
carries ``lora_task_id`` with ``lora_weights`` [1, rows, max row] (the model's dtype: TensorRT-LLM
checks it, loraValidateRequestTensors) and ``lora_config`` [1, rows, 3] int32 the first time; the
task id alone afterwards, while the adapter is in the cache.
"""
from __future__ import annotations

TRITON_DTYPES = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
#: TensorRT-LLM's default share of free GPU memory for the LoRA cache (PeftCacheConfig)
GPU_MEMORY_FRACTION = 0.05
MIB = 1 << 20


def lora_info(pre: dict, build: dict, plugin: dict) -> dict | None:
    """The engine's LoRA settings from its config.json (None: no LoRA plugin)."""
    dtype = plugin.get("lora_plugin")
    if not dtype:
        return None
    cfg = build.get("lora_config") or {}
    return {"dtype": str(dtype), "max_rank": int(cfg.get("max_lora_rank") or 64),
            "modules": list(cfg.get("lora_target_modules") or []),
            "adapter_bytes": _adapter_bytes(pre, cfg, str(dtype))}


def _adapter_bytes(pre: dict, cfg: dict, dtype: str) -> int:
    """One rank's cache bytes for an adapter of max_lora_rank on every target module and layer
    (the local in + out sizes of LoraModule::localInOutSize)."""
    tp = int((pre.get("mapping") or {}).get("tp_size", 1))
    hidden = int(pre.get("hidden_size", 0))
    heads = int(pre.get("num_attention_heads", 1))
    hd = int(pre.get("head_size") or hidden // max(heads, 1))
    kv = max(int(pre.get("num_key_value_heads") or heads) // tp, 1) * tp
    inter = int(pre.get("intermediate_size") or 0)
    q, k = heads * hd, kv * hd
    dims = {"attn_q": (hidden, q, False), "attn_k": (hidden, k, False),
            "attn_v": (hidden, k, False), "attn_dense": (q, hidden, True),
            "mlp_h_to_4h": (hidden, inter, False), "mlp_gate": (hidden, inter, False),
            "mlp_4h_to_h": (inter, hidden, True)}
    r = int(cfg.get("max_lora_rank") or 64)
    per_layer = 0
    for m in cfg.get("lora_target_modules") or []:
        fin, fout, split_in = dims.get(m, (0, 0, False))
        per_layer += r * ((fin // tp + fout) if split_in else (fin + fout // tp))
    return per_layer * int(pre.get("num_hidden_layers", 0)) * _ITEMSIZE.get(dtype, 2)


def weights_type(engine) -> str:
    """``lora_weights``' Triton type: the engine's LoRA dtype (fp16 without LoRA, as before)."""
    return TRITON_DTYPES[engine.lora["dtype"]] if engine.lora else "TYPE_FP16"


def client_inputs(engine) -> tuple:
    """The ensemble / BLS inputs of a LoRA engine, routed to tensorrt_llm."""
    if not engine.lora:
        return ()
    return (("lora_task_id", "TYPE_UINT64", [1], "o", ("llm", "lora_task_id")),
            ("lora_weights", weights_type(engine), [-1, -1], "o", ("llm", "lora_weights")),
            ("lora_config", "TYPE_INT32", [-1, 3], "o", ("llm", "lora_config")))


def cache_params(engine, adapters: int, prefetch_dir: str | None = None) -> dict:
    """The backend's lora_cache_* parameters: adapter sizes = max_lora_rank, host memory for
    every converted adapter (at least one) at max rank, rounded up to MiB; ``lora_prefetch_dir``
    (OUTPUT/lora, one <task id>/ per adapter) for float16 / float32 engines only: the backend
    reads it with TensorRT-LLM's C++ ``loadNpy``, which knows no bfloat16 (numpyUtils.cpp)."""
    if not engine.lora:
        return {}
    need = engine.lora["adapter_bytes"] * max(adapters, 1)
    out = {"lora_cache_optimal_adapter_size": engine.lora["max_rank"],
           "lora_cache_max_adapter_size": engine.lora["max_rank"],
           "lora_cache_gpu_memory_fraction": GPU_MEMORY_FRACTION,
           "lora_cache_host_memory_bytes": -(-need // MIB) * MIB}
    if prefetch_dir and adapters and engine.lora["dtype"] != "bfloat16":
        out["lora_prefetch_dir"] = prefetch_dir
    return out
