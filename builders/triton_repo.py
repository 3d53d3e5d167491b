"""Triton model repositories for the engines (``DIR/triton``), and their validation.

Two targets
-----------
``write_engine_repo`` — TensorRT engines (TensorRT-LLM <= 1.2.x) served by Triton's C++
``tensorrtllm`` backend, laid out as triton-inference-server/tensorrtllm_backend's
``all_models/inflight_batcher_llm`` (later NVIDIA/TensorRT-LLM ``triton_backend/all_models/
inflight_batcher_llm``)::

    triton/
      ensemble/            config.pbtxt, 1/          preprocessing → tensorrt_llm → postprocessing
      preprocessing/       config.pbtxt, 1/model.py  (Python backend: text → token ids, our own)
      tensorrt_llm/        config.pbtxt, 1/          (backend "tensorrtllm", gpt_model_path)
      postprocessing/      config.pbtxt, 1/model.py  (Python backend: token ids → text, our own)
      tensorrt_llm_bls/    config.pbtxt, 1/model.py  (only with --triton-bls; our own BLS model)
      launch_triton.sh     the tritonserver command line (mpirun, one process per rank)
      triton_repo.json     what was written, for people and tools (Triton ignores plain files)

Every ``config.pbtxt`` is *filled*: there is no ``${...}`` left. Instead of copying NVIDIA's
templates and running ``tools/fill_template.py`` over them, each config is built here as a Triton
``ModelConfig`` protobuf message (the schema shipped in ``tritonclient``) and printed with
protobuf's text format, so a typo in a field name or an enum value fails at build time.
Tensor names, data types and shapes are those of the 1.2-era templates; only the inputs a
text-only decoder model can use are wired into the ensemble (no multimodal, encoder-decoder,
p-tuning or LoRA tensors), and the ``tensorrt_llm`` model declares the backend's other optional
inputs too, so a client may still send them to it directly.

``write_llmapi_repo`` — current TensorRT-LLM (PyTorch backend, no engines) served by the LLM-API
Python model, laid out as NVIDIA/TensorRT-LLM ``triton_backend/all_models/llmapi``::

    triton/
      tensorrt_llm/        config.pbtxt, 1/model.yaml (LLM args + triton_config), 1/model.py
      launch_triton.sh, triton_repo.json

Values that come from the engine
--------------------------------
``engine_config`` is the engine's ``config.json`` as trtllm-build writes it (``pretrained_config``
+ ``build_config``). The repository is usually written *before* the engines exist (they are built
later, on a GPU host), so :func:`engine_config_from_checkpoint` produces the same shape from the
checkpoint's ``config.json`` and the engine build options (``--max-batch-size`` ...), which is
what trtllm-build will put there. A bare checkpoint config is accepted too (build defaults).
Used from it: ``mapping`` (world size → ``mpirun -n``), ``logits_dtype`` (the data type of the
logits outputs; the C++ backend checks it equals the engine's), ``vocab_size`` (checked against
the tokenizer), ``max_batch_size`` (cap of the Triton batch size), ``max_beam_width``,
``max_input_len`` (checked by the preprocessing model), ``plugin_config`` (in-flight batching
needs the paged KV cache, packed inputs and the attention plugin).

Paths
-----
Paths in ``config.pbtxt`` / ``model.yaml`` are absolute by default: the C++ backend opens
``gpt_model_path`` relative to tritonserver's working directory, so a relative path would depend
on where the server is started. For serving from another host or a container, pass
``--triton-model-root ROOT``: the directory at which the *build output directory* (the parent of
this repository, holding ``engines/`` and ``triton/``) will be mounted. Every path inside it is
then written as ``ROOT/<relative path>`` (e.g. ``/models/engines``) and the launch script serves
``ROOT/triton``. Paths outside it (a tokenizer in the HF model dir) are written unchanged and
listed under ``external_paths`` in ``triton_repo.json``; ``--triton-copy-tokenizer`` copies the
tokenizer files into the repository instead (``preprocessing/1/tokenizer``), making it
self-contained.

Writes go to a temporary directory beside ``out_dir``, are validated with :func:`validate_repo`,
then renamed into place (an existing ``out_dir`` is replaced only with ``--force``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import posixpath
import re
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from convert.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "triton_templates"

ENSEMBLE, PREPROCESSING, TENSORRT_LLM, POSTPROCESSING, BLS = (
    "ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
LAUNCH_SCRIPT = "launch_triton.sh"
REPO_INFO = "triton_repo.json"
TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
# upstream's default location of the orchestrator-mode worker inside the Triton TRT-LLM container
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
BATCHING_STRATEGIES = ("inflight_fused_batching", "inflight_batching", "V1")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
TARGETS = ("engine", "pytorch", "none")

# trtllm-build's defaults in TensorRT-LLM 1.2 (BuildConfig), used when a value is not given
_BUILD_DEFAULTS = {"max_batch_size": 2048, "max_input_len": 1024, "max_seq_len": None,
                   "max_num_tokens": 8192, "max_beam_width": 1}
_LOGITS_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}

# Files a tokenizer directory may need (AutoTokenizer falls back to config.json's model_type when
# tokenizer_config.json names no class); weights are never copied.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "chat_template.jinja",
                    "chat_template.json", "generation_config.json", "config.json")
_TOKENIZER_SUFFIXES = (".tiktoken",)

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


# --- options ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TritonOptions:
    """Options of the Triton repository writers (the ``add_triton_arguments`` flags)."""

    triton_target: str = "engine"
    tokenizer_dir: str | None = None
    triton_max_batch_size: int | None = None     # None: min(64, the engine's max_batch_size)
    decoupled: bool = False
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = False
    enable_chunked_context: bool = False
    exclude_input_in_output: bool = True
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 0
    triton_instance_count: int = 1
    triton_bls: bool = False
    triton_model_root: str | None = None
    triton_copy_tokenizer: bool = False
    force: bool = False

    @classmethod
    def from_any(cls, options) -> "TritonOptions":
        """From a TritonOptions, a mapping or an argparse Namespace (unknown names ignored, so the
        whole ``build_engine`` Namespace can be passed)."""
        if options is None:
            opts = cls()
        elif isinstance(options, cls):
            opts = options
        else:
            src = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
            kw = {f.name: src[f.name] for f in fields(cls) if f.name in src}
            if kw.get("tokenizer_dir") is not None:
                kw["tokenizer_dir"] = str(kw["tokenizer_dir"])
            if kw.get("triton_model_root") is not None:
                kw["triton_model_root"] = str(kw["triton_model_root"])
            opts = cls(**kw)
        opts.validate()
        return opts

    def validate(self) -> None:
        def whole(name, value, low):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"--{name.replace('_', '-')} must be a whole number >= {low} "
                                f"(got {value!r})")

        if self.triton_target not in TARGETS:
            raise UserError(f"--triton-target must be one of {', '.join(TARGETS)} "
                            f"(got {self.triton_target!r})")
        if self.triton_max_batch_size is not None:
            whole("triton_max_batch_size", self.triton_max_batch_size, 1)
        whole("max_queue_delay_microseconds", self.max_queue_delay_microseconds, 0)
        whole("max_queue_size", self.max_queue_size, 0)
        whole("triton_instance_count", self.triton_instance_count, 1)
        if self.batching_strategy not in BATCHING_STRATEGIES:
            raise UserError(f"--batching-strategy must be one of {', '.join(BATCHING_STRATEGIES)}"
                            f" (got {self.batching_strategy!r})")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise UserError(f"--batch-scheduler-policy must be one of "
                            f"{', '.join(SCHEDULER_POLICIES)} "
                            f"(got {self.batch_scheduler_policy!r})")
        f = self.kv_cache_free_gpu_mem_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise UserError(f"--kv-cache-free-gpu-mem-fraction must be in (0, 1] (got {f!r})")
        root = self.triton_model_root
        if root is not None and (not root.startswith("/") or "${" in root):
            raise UserError(f"--triton-model-root must be an absolute path on the serving host, "
                            f"e.g. /models (got {root!r})")

    def as_dict(self) -> dict:
        return asdict(self)


def add_triton_arguments(parser: argparse.ArgumentParser):
    """Add the Triton repository options to ``parser`` as one argument group; return the group.

    Defaults are those a ``tools/fill_template.py`` user of the NVIDIA docs would pass
    (decoupled_mode False, inflight_fused_batching, exclude_input_in_output True, no queue delay,
    KV-cache reuse off) and the backend's own defaults otherwise (kv_cache_free_gpu_mem_fraction
    0.9, guaranteed_no_evict).
    """
    g = parser.add_argument_group(
        "triton", "Triton model repository (DIR/triton): tensorrtllm_backend's "
                  "inflight_batcher_llm layout for engines, or the LLM-API layout (pytorch)")
    g.add_argument("--triton-target", choices=TARGETS, default="engine",
                   help="engine: ensemble/preprocessing/tensorrt_llm/postprocessing for the "
                        "TensorRT engines (TensorRT-LLM <= 1.2); pytorch: the LLM-API Python "
                        "model (current TensorRT-LLM, no engines); none: no repository "
                        "(default: engine)")
    g.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="tokenizer for pre/postprocessing (default: the HF model dir; required "
                        "with --from-checkpoint)")
    g.add_argument("--triton-max-batch-size", type=int, default=None,
                   help="Triton max_batch_size of every model (default: the engine's "
                        "max_batch_size, at most 64; TensorRT-LLM's scheduler may still run "
                        "more requests at once)")
    g.add_argument("--decoupled", action="store_true",
                   help="decoupled transaction policy: needed for streaming (stream=true, "
                        "generate_stream) (default: off)")
    g.add_argument("--batching-strategy", choices=BATCHING_STRATEGIES,
                   default="inflight_fused_batching",
                   help="gpt_model_type of the tensorrt_llm model (default: "
                        "inflight_fused_batching)")
    g.add_argument("--batch-scheduler-policy", choices=SCHEDULER_POLICIES,
                   default="guaranteed_no_evict",
                   help="TensorRT-LLM capacity scheduler (default: guaranteed_no_evict)")
    g.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9,
                   help="fraction of the free GPU memory (after weights) for the KV cache "
                        "(default: 0.9)")
    g.add_argument("--enable-kv-cache-reuse", action=argparse.BooleanOptionalAction,
                   default=False, help="reuse KV-cache blocks across requests with a common "
                                       "prefix (default: off)")
    g.add_argument("--enable-chunked-context", action=argparse.BooleanOptionalAction,
                   default=False, help="chunked prefill (default: off)")
    g.add_argument("--exclude-input-in-output", action=argparse.BooleanOptionalAction,
                   default=True, help="return only the completion, not prompt + completion "
                                      "(default: on)")
    g.add_argument("--max-queue-delay-microseconds", type=int, default=0,
                   help="dynamic batcher delay (default: 0)")
    g.add_argument("--max-queue-size", type=int, default=0,
                   help="requests queued before new ones are rejected (default: 0 = unbounded)")
    g.add_argument("--triton-instance-count", type=int, default=1,
                   help="instances of the preprocessing/postprocessing (and BLS) models "
                        "(default: 1)")
    g.add_argument("--triton-bls", action="store_true",
                   help="also write tensorrt_llm_bls, a Python BLS model with the ensemble's "
                        "inputs and outputs (default: off)")
    g.add_argument("--triton-model-root", default=None, metavar="ROOT",
                   help="absolute path at which the output dir will be mounted on the serving "
                        "host (e.g. /models): paths inside it are written as ROOT/...; "
                        "default: this host's absolute paths")
    g.add_argument("--triton-copy-tokenizer", action="store_true",
                   help="copy the tokenizer files into the repository (self-contained repo)")
    return g


# --- protobuf schema ----------------------------------------------------------------------------

_PB2 = None


def model_config_pb2():
    """``tritonclient.grpc.model_config_pb2``: Triton's own ModelConfig schema.

    ``tritonclient/grpc/__init__.py`` imports grpcio, which is only installed with the
    ``tritonclient[grpc]`` extra; without it the same generated module is loaded from its file
    (it needs only protobuf).
    """
    global _PB2
    if _PB2 is not None:
        return _PB2
    try:
        import google.protobuf  # noqa: F401
    except ImportError as e:
        raise UserError(f"protobuf is not installed ({e}); pip install protobuf") from None
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except Exception:  # noqa: BLE001 - RuntimeError when grpcio is absent
        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("tritonclient is not installed; pip install tritonclient") from None
        path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
        if not path.is_file():
            raise UserError(f"{path} is missing from the tritonclient install") from None
        mspec = importlib.util.spec_from_file_location("_tritonclient_model_config_pb2", path)
        pb2 = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(pb2)
    _PB2 = pb2
    return pb2


_ENUM_FIELDS = {"data_type", "kind"}
_MAP_FIELDS = {"parameters", "input_map", "output_map"}


def _quote(text: str) -> str:
    return '"' + (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) + '"'


def _scalar(field: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if field in _ENUM_FIELDS:
        return str(value)
    if isinstance(value, str):
        return _quote(value)
    return repr(value)


def _pbtxt(message: dict, indent: int = 0) -> list[str]:
    """Protobuf text format in the style of the upstream templates (``dims: [ -1, -1 ]``,
    ``input [ {...}, {...} ]``, every value written out, defaults included)."""
    pad = "  " * indent
    lines = []
    for field, value in message.items():
        if field in _MAP_FIELDS:
            for key, item in value.items():
                lines += [f"{pad}{field} {{", f"{pad}  key: {_quote(key)}"]
                if isinstance(item, dict):
                    lines += [f"{pad}  value {{", *_pbtxt(item, indent + 2), f"{pad}  }}"]
                else:
                    lines.append(f"{pad}  value: {_scalar(field, item)}")
                lines.append(f"{pad}}}")
        elif isinstance(value, dict):
            lines += [f"{pad}{field} {{", *_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{field} [")
            for i, item in enumerate(value):
                comma = "," if i < len(value) - 1 else ""
                lines += [f"{pad}  {{", *_pbtxt(item, indent + 2), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            inner = ", ".join(_scalar(field, v) for v in value)
            lines.append(f"{pad}{field}: [ {inner} ]" if inner else f"{pad}{field}: [ ]")
        else:
            lines.append(f"{pad}{field}: {_scalar(field, value)}")
    return lines


def _render(config: dict) -> str:
    """A config dict (ModelConfig field names) → config.pbtxt text. The dict is first read into
    Triton's ModelConfig message (unknown fields or enum values fail), and the text must parse
    back to the same message."""
    from google.protobuf import json_format, text_format

    pb2 = model_config_pb2()
    try:
        expected = json_format.ParseDict(config, pb2.ModelConfig())
    except json_format.ParseError as e:  # a bug in this module, not a user mistake
        raise RuntimeError(f"bad ModelConfig for {config.get('name')}: {e}") from e
    text = ("# Written by build_engine (builders/triton_repo.py) and checked against Triton's "
            "ModelConfig schema.\n" + "\n".join(_pbtxt(config)) + "\n")
    if text_format.Parse(text, pb2.ModelConfig()) != expected:
        raise RuntimeError(f"config.pbtxt of {config.get('name')} does not round-trip")
    return text


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse config.pbtxt text with Triton's ModelConfig schema; UserError on failure."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_pb2().ModelConfig())
    except text_format.ParseError as e:
        raise UserError(f"{where}: not a valid Triton model config: {e}") from None


# --- tensors of each model ----------------------------------------------------------------------
# (name, data type, dims, flags): flags "o" optional, "s" reshape to a scalar ([1] → []),
# "r" allow_ragged_batch. Names, types and shapes follow the 1.2-era inflight_batcher_llm
# templates; "LOGITS" stands for the engine's logits data type.

_TRTLLM_INPUTS = (
    ("input_ids", "TYPE_INT32", [-1], "or"),
    ("input_lengths", "TYPE_INT32", [1], "s"),
    ("request_output_len", "TYPE_INT32", [1], "s"),
    ("num_return_sequences", "TYPE_INT32", [1], "so"),
    ("draft_input_ids", "TYPE_INT32", [-1], "or"),
    ("draft_logits", "LOGITS", [-1, -1], "or"),
    ("draft_acceptance_threshold", "TYPE_FP32", [1], "so"),
    ("end_id", "TYPE_INT32", [1], "so"),
    ("pad_id", "TYPE_INT32", [1], "so"),
    ("stop_words_list", "TYPE_INT32", [2, -1], "or"),
    ("bad_words_list", "TYPE_INT32", [2, -1], "or"),
    ("embedding_bias", "TYPE_FP32", [-1], "or"),
    ("beam_width", "TYPE_INT32", [1], "so"),
    ("temperature", "TYPE_FP32", [1], "so"),
    ("runtime_top_k", "TYPE_INT32", [1], "so"),
    ("runtime_top_p", "TYPE_FP32", [1], "so"),
    ("runtime_top_p_min", "TYPE_FP32", [1], "so"),
    ("runtime_top_p_decay", "TYPE_FP32", [1], "so"),
    ("runtime_top_p_reset_ids", "TYPE_INT32", [1], "so"),
    ("len_penalty", "TYPE_FP32", [1], "so"),
    ("early_stopping", "TYPE_BOOL", [1], "so"),
    ("repetition_penalty", "TYPE_FP32", [1], "so"),
    ("min_tokens", "TYPE_INT32", [1], "so"),
    ("beam_search_diversity_rate", "TYPE_FP32", [1], "so"),
    ("presence_penalty", "TYPE_FP32", [1], "so"),
    ("frequency_penalty", "TYPE_FP32", [1], "so"),
    ("seed", "TYPE_UINT64", [1], "so"),
    ("return_log_probs", "TYPE_BOOL", [1], "so"),
    ("return_context_logits", "TYPE_BOOL", [1], "so"),
    ("return_generation_logits", "TYPE_BOOL", [1], "so"),
    ("return_perf_metrics", "TYPE_BOOL", [1], "so"),
    ("exclude_input_in_output", "TYPE_BOOL", [1], "so"),
    ("stop", "TYPE_BOOL", [1], "so"),
    ("streaming", "TYPE_BOOL", [1], "so"),
    ("prompt_embedding_table", "TYPE_FP16", [-1, -1], "or"),
    ("prompt_vocab_size", "TYPE_INT32", [1], "so"),
    ("lora_task_id", "TYPE_UINT64", [1], "so"),
    ("lora_weights", "TYPE_FP16", [-1, -1], "or"),
    ("lora_config", "TYPE_INT32", [-1, 3], "or"),
    ("context_phase_params", "TYPE_UINT8", [-1], "or"),
    ("guided_decoding_guide_type", "TYPE_STRING", [1], "or"),
    ("guided_decoding_guide", "TYPE_STRING", [1], "or"),
)
_PERF_OUTPUTS = (
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", [1], ""),
    ("kv_cache_reused_blocks", "TYPE_INT32", [1], ""),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", [1], ""),
    ("arrival_time_ns", "TYPE_INT64", [1], ""),
    ("first_scheduled_time_ns", "TYPE_INT64", [1], ""),
    ("first_token_time_ns", "TYPE_INT64", [1], ""),
    ("last_token_time_ns", "TYPE_INT64", [1], ""),
    ("acceptance_rate", "TYPE_FP32", [1], ""),
    ("total_accepted_draft_tokens", "TYPE_INT32", [1], ""),
    ("total_draft_tokens", "TYPE_INT32", [1], ""),
)
_RESULT_OUTPUTS = (  # outputs of tensorrt_llm that the ensemble and the BLS model pass on
    ("cum_log_probs", "TYPE_FP32", [-1], ""),
    ("output_log_probs", "TYPE_FP32", [-1, -1], ""),
    ("context_logits", "LOGITS", [-1, -1], ""),
    ("generation_logits", "LOGITS", [-1, -1, -1], ""),
    ("batch_index", "TYPE_INT32", [1], ""),
    ("sequence_index", "TYPE_INT32", [1], ""),
)
_TRTLLM_OUTPUTS = (
    ("output_ids", "TYPE_INT32", [-1, -1], ""),
    ("sequence_length", "TYPE_INT32", [-1], ""),
) + _RESULT_OUTPUTS + (("context_phase_params", "TYPE_UINT8", [-1], ""),) + _PERF_OUTPUTS

_PRE_INPUTS = (
    ("QUERY", "TYPE_STRING", [1], ""),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1], ""),
    ("BAD_WORDS_DICT", "TYPE_STRING", [-1], "o"),
    ("STOP_WORDS_DICT", "TYPE_STRING", [-1], "o"),
    ("END_ID", "TYPE_INT32", [1], "o"),
    ("PAD_ID", "TYPE_INT32", [1], "o"),
)
_PRE_OUTPUTS = (
    ("INPUT_ID", "TYPE_INT32", [-1], ""),
    ("REQUEST_INPUT_LEN", "TYPE_INT32", [1], ""),
    ("BAD_WORDS_IDS", "TYPE_INT32", [2, -1], ""),
    ("STOP_WORDS_IDS", "TYPE_INT32", [2, -1], ""),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", [-1], ""),
    ("OUT_END_ID", "TYPE_INT32", [1], ""),
    ("OUT_PAD_ID", "TYPE_INT32", [1], ""),
)
_POST_INPUTS = (
    ("TOKENS_BATCH", "TYPE_INT32", [-1, -1], ""),
    ("SEQUENCE_LENGTH", "TYPE_INT32", [-1], ""),
)
_POST_OUTPUTS = (("OUTPUT", "TYPE_STRING", [-1], ""),)

# The client-facing tensors of the ensemble (and of the BLS model): (ensemble name, type, dims,
# flags, where it goes: ("pre"|"llm", that model's input name)).
_CLIENT_INPUTS = (
    ("text_input", "TYPE_STRING", [1], "", ("pre", "QUERY")),
    ("max_tokens", "TYPE_INT32", [1], "", ("pre", "REQUEST_OUTPUT_LEN")),
    ("bad_words", "TYPE_STRING", [-1], "o", ("pre", "BAD_WORDS_DICT")),
    ("stop_words", "TYPE_STRING", [-1], "o", ("pre", "STOP_WORDS_DICT")),
    ("end_id", "TYPE_INT32", [1], "o", ("pre", "END_ID")),
    ("pad_id", "TYPE_INT32", [1], "o", ("pre", "PAD_ID")),
    ("num_return_sequences", "TYPE_INT32", [1], "o", ("llm", "num_return_sequences")),
    ("exclude_input_in_output", "TYPE_BOOL", [1], "o", ("llm", "exclude_input_in_output")),
    ("top_k", "TYPE_INT32", [1], "o", ("llm", "runtime_top_k")),
    ("top_p", "TYPE_FP32", [1], "o", ("llm", "runtime_top_p")),
    ("temperature", "TYPE_FP32", [1], "o", ("llm", "temperature")),
    ("length_penalty", "TYPE_FP32", [1], "o", ("llm", "len_penalty")),
    ("repetition_penalty", "TYPE_FP32", [1], "o", ("llm", "repetition_penalty")),
    ("min_tokens", "TYPE_INT32", [1], "o", ("llm", "min_tokens")),
    ("presence_penalty", "TYPE_FP32", [1], "o", ("llm", "presence_penalty")),
    ("frequency_penalty", "TYPE_FP32", [1], "o", ("llm", "frequency_penalty")),
    ("seed", "TYPE_UINT64", [1], "o", ("llm", "seed")),
    ("return_log_probs", "TYPE_BOOL", [1], "o", ("llm", "return_log_probs")),
    ("return_context_logits", "TYPE_BOOL", [1], "o", ("llm", "return_context_logits")),
    ("return_generation_logits", "TYPE_BOOL", [1], "o", ("llm", "return_generation_logits")),
    ("return_perf_metrics", "TYPE_BOOL", [1], "o", ("llm", "return_perf_metrics")),
    ("beam_width", "TYPE_INT32", [1], "o", ("llm", "beam_width")),
    ("stream", "TYPE_BOOL", [1], "o", ("llm", "streaming")),
)
_CLIENT_OUTPUTS = (("text_output", "TYPE_STRING", [-1], ""),) + _RESULT_OUTPUTS + _PERF_OUTPUTS

# preprocessing output → tensorrt_llm input (through ensemble tensors named "_" + output)
_PRE_TO_LLM = (("INPUT_ID", "input_ids"), ("REQUEST_INPUT_LEN", "input_lengths"),
               ("REQUEST_OUTPUT_LEN", "request_output_len"), ("OUT_END_ID", "end_id"),
               ("OUT_PAD_ID", "pad_id"), ("STOP_WORDS_IDS", "stop_words_list"),
               ("BAD_WORDS_IDS", "bad_words_list"))


def _tensor(spec, logits_type: str) -> dict:
    name, dtype, dims, flags = spec[:4]
    t = {"name": name, "data_type": logits_type if dtype == "LOGITS" else dtype,
         "dims": list(dims)}
    if "s" in flags:
        t["reshape"] = {"shape": []}
    if "o" in flags:
        t["optional"] = True
    if "r" in flags:
        t["allow_ragged_batch"] = True
    return t


def _params(values: dict) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _bool(v: bool) -> str:
    return "true" if v else "false"


# --- engine config ------------------------------------------------------------------------------

def _option(options, name, default):
    if options is None:
        return default
    if isinstance(options, dict):
        value = options.get(name, default)
    else:
        value = getattr(options, name, default)
    return default if value is None else value


def _deduced_max_seq_len(pretrained: dict) -> int | None:
    """max_seq_len as trtllm-build deduces it when not given: max_position_embeddings times the
    rope scaling factor (not for the su/longrope/llama3/yarn kinds, whose factor is not a
    length multiplier)."""
    n = pretrained.get("max_position_embeddings")
    if not n:
        return None
    scaling = pretrained.get("rotary_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = scaling.get("factor", 1.0) if kind not in ("su", "longrope", "llama3", "yarn") else 1
    return int(n * (factor or 1))


def engine_config_from_checkpoint(checkpoint_config: dict, build_options=None) -> dict:
    """The engine ``config.json`` (the parts this module reads) that trtllm-build will write for
    ``checkpoint_config`` (a TRT-LLM checkpoint's config.json) and ``build_options`` (an
    EngineOptions, Namespace or dict with trtllm-build names: max_batch_size, max_input_len,
    max_seq_len, max_num_tokens, max_beam_width, paged_kv_cache, remove_input_padding,
    gpt_attention_plugin; missing ones take trtllm-build 1.2's defaults).

    Shape: ``{"version": None, "pretrained_config": <checkpoint config>, "build_config":
    {"max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
    "plugin_config": {"paged_kv_cache": bool, "remove_input_padding": bool,
    "gpt_attention_plugin": str}}}`` — the same keys as a real engine config.json.
    """
    if not isinstance(checkpoint_config, dict) or "mapping" not in checkpoint_config:
        raise UserError("engine config: expected a TRT-LLM checkpoint config.json (with "
                        "'mapping') to derive the engine config from")
    build = {k: _option(build_options, k, d) for k, d in _BUILD_DEFAULTS.items()}
    if build["max_seq_len"] is None:
        build["max_seq_len"] = _deduced_max_seq_len(checkpoint_config)
    plugin = {
        "paged_kv_cache": _option(build_options, "paged_kv_cache", "enable") != "disable",
        "remove_input_padding":
            _option(build_options, "remove_input_padding", "enable") != "disable",
        "gpt_attention_plugin": _option(build_options, "gpt_attention_plugin", "auto"),
    }
    build["plugin_config"] = plugin
    return {"version": None, "pretrained_config": checkpoint_config, "build_config": build}


@dataclass(frozen=True)
class _Engine:
    tp: int
    pp: int
    world_size: int
    logits_type: str
    vocab_size: int | None
    max_batch_size: int
    max_beam_width: int
    max_input_len: int | None
    max_seq_len: int | None
    plugin: dict
    architecture: str | None
    dtype: str | None


def _read_engine_config(engine_config: dict) -> _Engine:
    if not isinstance(engine_config, dict):
        raise UserError("engine config: expected a dict (an engine or checkpoint config.json)")
    if "pretrained_config" not in engine_config:
        if "architecture" in engine_config and "mapping" in engine_config:
            engine_config = engine_config_from_checkpoint(engine_config)
        else:
            raise UserError("engine config: neither an engine config.json (pretrained_config + "
                            "build_config) nor a TRT-LLM checkpoint config.json (architecture + "
                            "mapping)")
    pre = engine_config["pretrained_config"] or {}
    build = engine_config.get("build_config") or {}
    mapping = pre.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if tp < 1 or pp < 1 or world != tp * pp * int(mapping.get("cp_size", 1)):
        raise UserError(f"engine config: mapping {mapping} is inconsistent (world_size must be "
                        f"tp_size * pp_size)")
    logits_dtype = pre.get("logits_dtype") or "float32"
    if logits_dtype not in _LOGITS_TYPES:
        raise UserError(f"engine config: logits_dtype {logits_dtype!r} is not one of "
                        f"{', '.join(_LOGITS_TYPES)}")
    plugin = build.get("plugin_config") or {}
    max_batch = int(build.get("max_batch_size") or _BUILD_DEFAULTS["max_batch_size"])
    return _Engine(
        tp=tp, pp=pp, world_size=world, logits_type=_LOGITS_TYPES[logits_dtype],
        vocab_size=pre.get("vocab_size"), max_batch_size=max_batch,
        max_beam_width=int(build.get("max_beam_width") or 1),
        max_input_len=build.get("max_input_len"), max_seq_len=build.get("max_seq_len"),
        plugin=plugin, architecture=pre.get("architecture"), dtype=pre.get("dtype"))


def _check_batching(engine: _Engine, strategy: str) -> None:
    """In-flight batching needs what trtllm-build enables by default; an engine built without
    them only works with V1 (static batching)."""
    if strategy == "V1":
        return
    missing = []
    p = engine.plugin
    if p.get("paged_kv_cache") is False:
        missing.append("--paged-kv-cache enable")
    if p.get("remove_input_padding") is False:
        missing.append("--remove-input-padding enable")
    if p.get("gpt_attention_plugin") in ("disable", None) and "gpt_attention_plugin" in p:
        missing.append("--gpt-attention-plugin auto")
    if missing:
        raise UserError(f"--batching-strategy {strategy} needs an engine built with "
                        f"{', '.join(missing)}; rebuild with it or use --batching-strategy V1")


# --- paths --------------------------------------------------------------------------------------

class _Paths:
    """Maps local paths to what the serving host sees (see the module docstring)."""

    def __init__(self, out_dir: Path, model_root: str | None):
        self.build_root = out_dir.parent.resolve()
        self.out_dir = out_dir
        self.model_root = (model_root.rstrip("/") or "/") if model_root else None
        self.external: list[str] = []

    def serve(self, path) -> str:
        p = Path(path).expanduser().resolve()
        if self.model_root is None:
            return str(p)
        try:
            rel = p.relative_to(self.build_root)
        except ValueError:
            if str(p) not in self.external:
                self.external.append(str(p))
            return str(p)
        return posixpath.join(self.model_root, rel.as_posix()) if rel.parts else self.model_root

    @property
    def repo(self) -> str:
        return self.serve(self.out_dir)


def check_tokenizer(tokenizer_dir, vocab_size: int | None = None,
                     what: str = "--tokenizer-dir") -> Path:
    if tokenizer_dir is None:
        raise UserError("the Triton repository needs a tokenizer: pass --tokenizer-dir (the HF "
                        "model dir that the checkpoint was made from)")
    d = Path(tokenizer_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"{what} {d}: not a directory")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {d}: transformers cannot load a tokenizer from it ({first}); "
                        f"pass --tokenizer-dir") from None
    if vocab_size and len(tok) > int(vocab_size):
        raise UserError(f"{what} {d}: the tokenizer has {len(tok)} tokens but the model's "
                        f"vocab_size is {vocab_size}; is it the tokenizer of this model?")
    return d


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in _TOKENIZER_FILES or f.suffix in _TOKENIZER_SUFFIXES):
            shutil.copy2(f, dst / f.name)
            copied += 1
    if not copied:
        raise UserError(f"--tokenizer-dir {src}: no tokenizer files found to copy")


# --- writers ------------------------------------------------------------------------------------

def _atomic_repo(out_dir, options: TritonOptions, build) -> Path:
    """Run ``build(tmp_dir)``, validate, and rename ``tmp_dir`` to ``out_dir``."""
    out_dir = Path(out_dir).expanduser().absolute()
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not options.force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from a tritonserver running as another user
        build(tmp)
        validate_repo(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write(path: Path, text: str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _copy_template(rel: str, dst: Path) -> None:
    src = TEMPLATES / rel
    if not src.is_file():
        raise RuntimeError(f"packaged template {src} is missing (broken install?)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _dynamic_batching(b: int, opts: TritonOptions) -> dict:
    return {"preferred_batch_size": [b],
            "max_queue_delay_microseconds": opts.max_queue_delay_microseconds,
            "default_queue_policy": {"max_queue_size": opts.max_queue_size}}


def _cpu_instances(count: int) -> list:
    return [{"count": count, "kind": "KIND_CPU"}]


def engine_model_configs(*, engine: _Engine, opts: TritonOptions, engine_path: str,
                         tokenizer_path: str, batch: int) -> dict[str, dict]:
    """The config dicts (ModelConfig field names) of the engine repository's models."""
    lt = engine.logits_type
    cfgs = {}
    cfgs[PREPROCESSING] = {
        "name": PREPROCESSING, "backend": "python", "max_batch_size": batch,
        "dynamic_batching": _dynamic_batching(batch, opts),
        "input": [_tensor(t, lt) for t in _PRE_INPUTS],
        "output": [_tensor(t, lt) for t in _PRE_OUTPUTS],
        "instance_group": _cpu_instances(opts.triton_instance_count),
        "parameters": _params({
            "tokenizer_dir": tokenizer_path, "add_special_tokens": "true",
            "max_input_len": engine.max_input_len or 0, "trust_remote_code": "false"}),
    }
    llm_params = {
        "gpt_model_type": opts.batching_strategy,
        "gpt_model_path": engine_path,
        "max_beam_width": engine.max_beam_width,
        "batch_scheduler_policy": opts.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": opts.kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": _bool(opts.enable_kv_cache_reuse),
        "enable_chunked_context": _bool(opts.enable_chunked_context),
        "exclude_input_in_output": _bool(opts.exclude_input_in_output),
        "normalize_log_probs": "true",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": EXECUTOR_WORKER,
        # Read without a fallback by the C++ backend (getGuidedDecodingConfigFromParams in
        # inflight_batcher_llm/src/model_instance_state.cc): they must be present; empty = off.
        "tokenizer_dir": tokenizer_path,
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
    }
    cfgs[TENSORRT_LLM] = {
        "name": TENSORRT_LLM, "backend": "tensorrtllm", "max_batch_size": batch,
        "model_transaction_policy": {"decoupled": opts.decoupled},
        "dynamic_batching": _dynamic_batching(batch, opts),
        "input": [_tensor(t, lt) for t in _TRTLLM_INPUTS],
        "output": [_tensor(t, lt) for t in _TRTLLM_OUTPUTS],
        "instance_group": _cpu_instances(1),
        "parameters": _params(llm_params),
    }
    cfgs[POSTPROCESSING] = {
        "name": POSTPROCESSING, "backend": "python", "max_batch_size": batch,
        "dynamic_batching": {},
        "input": [_tensor(t, lt) for t in _POST_INPUTS],
        "output": [_tensor(t, lt) for t in _POST_OUTPUTS],
        "instance_group": _cpu_instances(opts.triton_instance_count),
        "parameters": _params({"tokenizer_dir": tokenizer_path, "skip_special_tokens": "true",
                               "trust_remote_code": "false"}),
    }
    pre_step = {"model_name": PREPROCESSING, "model_version": -1, "input_map": {},
                "output_map": {o[0]: "_" + o[0] for o in _PRE_OUTPUTS}}
    llm_step = {"model_name": TENSORRT_LLM, "model_version": -1,
                "input_map": {llm: "_" + pre for pre, llm in _PRE_TO_LLM},
                "output_map": {"output_ids": "_TOKENS_BATCH",
                               "sequence_length": "_SEQUENCE_LENGTH"}}
    for name, _, _, _, (model, key) in _CLIENT_INPUTS:
        (pre_step if model == "pre" else llm_step)["input_map"][key] = name
    for t in _RESULT_OUTPUTS + _PERF_OUTPUTS:
        llm_step["output_map"][t[0]] = t[0]
    post_step = {"model_name": POSTPROCESSING, "model_version": -1,
                 "input_map": {"TOKENS_BATCH": "_TOKENS_BATCH",
                               "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
                 "output_map": {"OUTPUT": "text_output"}}
    cfgs[ENSEMBLE] = {
        "name": ENSEMBLE, "platform": "ensemble", "max_batch_size": batch,
        "input": [_tensor(t, lt) for t in _CLIENT_INPUTS],
        "output": [_tensor(t, lt) for t in _CLIENT_OUTPUTS],
        "ensemble_scheduling": {"step": [pre_step, llm_step, post_step]},
    }
    if opts.triton_bls:
        cfgs[BLS] = {
            "name": BLS, "backend": "python", "max_batch_size": batch,
            "model_transaction_policy": {"decoupled": opts.decoupled},
            "input": [_tensor(t, lt) for t in _CLIENT_INPUTS],
            "output": [_tensor(t, lt) for t in _CLIENT_OUTPUTS],
            "instance_group": _cpu_instances(opts.triton_instance_count),
            "parameters": _params({
                "preprocessing_model_name": PREPROCESSING,
                "tensorrt_llm_model_name": TENSORRT_LLM,
                "postprocessing_model_name": POSTPROCESSING,
                # BLS tensor name → (model, that model's tensor name), read by its model.py
                "input_routes": json.dumps({n: list(r) for n, _, _, _, r in _CLIENT_INPUTS},
                                           sort_keys=True)}),
        }
    return cfgs


def launch_command(model_repository: str, world_size: int = 1, *,
                   tritonserver: str = TRITONSERVER, http_port: int = 8000,
                   grpc_port: int = 8001, metrics_port: int = 8002,
                   tensorrt_llm_model: str = TENSORRT_LLM) -> list[str]:
    """The command tensorrtllm_backend's ``scripts/launch_triton_server.py --world_size N
    --model_repo REPO`` runs: ``mpirun -n 1 tritonserver ... : -n 1 tritonserver ...``, one
    process per rank; ranks > 0 load only the tensorrt_llm model (leader mode)."""
    cmd = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        cmd += ["-n", "1", tritonserver, f"--model-repository={model_repository}"]
        if rank:
            cmd += ["--model-control-mode=explicit", f"--load-model={tensorrt_llm_model}"]
        cmd += [f"--grpc-port={grpc_port}", f"--http-port={http_port}",
                f"--metrics-port={metrics_port}", "--disable-auto-complete-config",
                f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank < world_size - 1:
            cmd.append(":")
    return cmd


def _dq(text: str) -> str:
    """Escape ``text`` for use inside double quotes in bash."""
    return re.sub(r'(["$`\\}])', r"\\\1", text)


def _launch_script(repo: str, world_size: int, note: str, requests: list[str]) -> str:
    """launch_triton.sh: :func:`launch_command` with the repository and the tritonserver binary
    overridable by $TRITON_MODEL_REPO and $TRITONSERVER."""
    ranks = []
    for rank in range(world_size):
        words = ["-n", "1", '"$TRITONSERVER"', '--model-repository="$REPO"']
        if rank:
            words += ["--model-control-mode=explicit", f"--load-model={TENSORRT_LLM}"]
        words += ["--grpc-port=8001", "--http-port=8000", "--metrics-port=8002",
                  "--disable-auto-complete-config",
                  f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        ranks.append(" ".join(words))
    body = "mpirun --allow-run-as-root \\\n  " + " : \\\n  ".join(ranks)
    reqs = "\n".join(f"#   {r}" for r in requests)
    return (f"#!/usr/bin/env bash\n# Written by build_engine. {note}\n"
            f"# Same command line as tensorrtllm_backend's scripts/launch_triton_server.py "
            f"--world_size {world_size} --model_repo <this directory>.\n"
            f"# Requests, once the server is ready (curl localhost:8000/v2/health/ready):\n"
            f"{reqs}\nset -euo pipefail\n"
            f'REPO="${{TRITON_MODEL_REPO:-{_dq(repo)}}}"\n'
            f'TRITONSERVER="${{TRITONSERVER:-{TRITONSERVER}}}"\n'
            f"exec {body}\n")


ENGINE_CURL = ("curl -X POST localhost:8000/v2/models/ensemble/generate -d "
               "'{\"text_input\": \"What is machine learning?\", \"max_tokens\": 64, "
               "\"temperature\": 0.7, \"top_p\": 0.9}'")
ENGINE_CURL_STREAM = ("curl -X POST localhost:8000/v2/models/ensemble/generate_stream -d "
                      "'{\"text_input\": \"What is machine learning?\", \"max_tokens\": 64, "
                      "\"stream\": true}'")
LLMAPI_CURL = ("curl -X POST localhost:8000/v2/models/tensorrt_llm/generate -d "
               "'{\"text_input\": \"What is machine learning?\", "
               "\"sampling_param_max_tokens\": 64}'")


def write_engine_repo(out_dir, *, engine_dir, tokenizer_dir, engine_config: dict | None,
                      options=None) -> Path:
    """Write the filled inflight_batcher_llm repository for ``engine_dir`` into ``out_dir``.

    ``engine_config``: the engine's config.json as a dict, or :func:`engine_config_from_checkpoint`
    of the checkpoint config and build options when the engines are not built yet (a bare
    checkpoint config.json is accepted too); None reads ``engine_dir/config.json``.
    ``options``: TritonOptions, or the CLI Namespace.
    Returns ``out_dir``. Raises UserError (one line) for bad inputs.
    """
    opts = TritonOptions.from_any(options)
    if engine_config is None:  # the engines exist already: read their config.json
        cfg_path = Path(engine_dir) / "config.json"
        try:
            engine_config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg_path}: cannot read the engine config ({e}); build the engines "
                            f"first or pass the checkpoint config") from None
    engine = _read_engine_config(engine_config)
    _check_batching(engine, opts.batching_strategy)
    tok_dir = check_tokenizer(tokenizer_dir or opts.tokenizer_dir, engine.vocab_size)
    batch = opts.triton_max_batch_size or min(64, engine.max_batch_size)
    paths = _Paths(Path(out_dir).expanduser().absolute(), opts.triton_model_root)
    engine_path = paths.serve(engine_dir)
    if opts.triton_copy_tokenizer:
        tokenizer_path = paths.serve(paths.out_dir / PREPROCESSING / "1" / "tokenizer")
    else:
        tokenizer_path = paths.serve(tok_dir)
    cfgs = engine_model_configs(engine=engine, opts=opts, engine_path=engine_path,
                                tokenizer_path=tokenizer_path, batch=batch)
    repo = paths.repo

    def build(tmp: Path) -> None:
        for name, cfg in cfgs.items():
            _write(tmp / name / "config.pbtxt", _render(cfg))
            (tmp / name / "1").mkdir(parents=True, exist_ok=True)
        for name in (PREPROCESSING, POSTPROCESSING) + ((BLS,) if opts.triton_bls else ()):
            _copy_template(f"engine/{name}/1/model.py", tmp / name / "1" / "model.py")
        if opts.triton_copy_tokenizer:
            _copy_tokenizer(tok_dir, tmp / PREPROCESSING / "1" / "tokenizer")
        requests = [ENGINE_CURL] + ([ENGINE_CURL_STREAM] if opts.decoupled else [])
        note = (f"Engines: {engine_path} (world size {engine.world_size} = tp {engine.tp} x "
                f"pp {engine.pp}: one tritonserver process per rank).")
        _write(tmp / LAUNCH_SCRIPT, _launch_script(repo, engine.world_size, note, requests),
               executable=True)
        info = {
            "generated_by": "build_engine (builders/triton_repo.py)",
            "target": "engine", "layout": "tensorrtllm_backend all_models/inflight_batcher_llm",
            "model_repository": repo, "models": sorted(cfgs),
            "engine_dir": engine_path, "tokenizer_dir": tokenizer_path,
            "world_size": engine.world_size, "tp_size": engine.tp, "pp_size": engine.pp,
            "architecture": engine.architecture, "dtype": engine.dtype,
            "triton_max_batch_size": batch, "engine_max_batch_size": engine.max_batch_size,
            "max_input_len": engine.max_input_len, "max_seq_len": engine.max_seq_len,
            "logits_datatype": engine.logits_type,
            "launch": launch_command(repo, engine.world_size),
            "requests": requests, "external_paths": sorted(paths.external),
            "options": opts.as_dict(),
        }
        _write(tmp / REPO_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")

    return _atomic_repo(out_dir, opts, build)


def _check_hf_model_dir(model_dir) -> Path:
    d = Path(model_dir).expanduser()
    cfg = d / "config.json"
    if not cfg.is_file():
        raise UserError(f"{d}: no config.json; the PyTorch (LLM-API) target serves a Hugging Face "
                        f"checkpoint directory")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg}: unreadable ({e})") from None
    if "pretrained_config" in data or ("architecture" in data and "mapping" in data):
        raise UserError(f"{d} is a TensorRT-LLM engine/checkpoint dir; the PyTorch (LLM-API) "
                        f"target needs the Hugging Face (or unified quantized HF) checkpoint")
    return d


def llmapi_model_yaml(*, model_path: str, tokenizer_path: str | None, tp: int, pp: int,
                      opts: TritonOptions, llm_args: dict | None = None) -> dict:
    data = {"model": model_path}
    if tokenizer_path and tokenizer_path != model_path:
        data["tokenizer"] = tokenizer_path
    data.update({"backend": "pytorch", "tensor_parallel_size": tp, "pipeline_parallel_size": pp})
    data.update(llm_args or {})
    data["kv_cache_config"] = {"free_gpu_memory_fraction": opts.kv_cache_free_gpu_mem_fraction,
                               "enable_block_reuse": opts.enable_kv_cache_reuse}
    if opts.enable_chunked_context:
        data["enable_chunked_prefill"] = True
    # the LLM-API model takes one prompt per request (upstream: "does not support batching")
    data["triton_config"] = {"max_batch_size": 0, "decoupled": opts.decoupled}
    return data


def write_llmapi_repo(out_dir, *, model_dir, tokenizer_dir=None, tp: int = 1, pp: int = 1,
                      options=None) -> Path:
    """Write the LLM-API (PyTorch backend) repository serving ``model_dir`` (a HF or unified
    quantized HF checkpoint) with ``tp`` x ``pp`` GPUs into ``out_dir``; returns ``out_dir``.

    LLM(...) size limits are taken from ``options`` when it has them (the engine flags
    ``--max-batch-size``, ``--max-num-tokens``, ``--max-seq-len``, ``--max-beam-width``, passed
    only when not None).
    """
    opts = TritonOptions.from_any(options)
    for name, v in (("tp", tp), ("pp", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"--{name} must be a whole number >= 1 (got {v!r})")
    model = _check_hf_model_dir(model_dir)
    tok_dir = tokenizer_dir or opts.tokenizer_dir
    # LLM(...) loads the tokenizer from the model dir unless told otherwise: check it loads
    check_tokenizer(tok_dir or model, what="--tokenizer-dir" if tok_dir else "model dir")
    paths = _Paths(Path(out_dir).expanduser().absolute(), opts.triton_model_root)
    model_path = paths.serve(model)
    tokenizer_path = paths.serve(tok_dir) if tok_dir is not None else None
    llm_args = {}
    for key in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width"):
        v = _option(options if not isinstance(options, TritonOptions) else None, key, None)
        if v is not None:
            llm_args[key] = int(v)
    data = llmapi_model_yaml(model_path=model_path, tokenizer_path=tokenizer_path, tp=tp, pp=pp,
                             opts=opts, llm_args=llm_args)
    check_llmapi_model_yaml(data, "model.yaml")
    cfg = llmapi_model_config(decoupled=opts.decoupled)
    repo = paths.repo

    def build(tmp: Path) -> None:
        import yaml

        d = tmp / TENSORRT_LLM
        _write(d / "config.pbtxt", _render(cfg))
        header = ("# Written by build_engine (builders/triton_repo.py). LLM-API arguments "
                  "(tensorrt_llm.LLM(**kwargs), all keys but triton_config)\n"
                  "# and triton_config, read by 1/model.py; see NVIDIA/TensorRT-LLM "
                  "triton_backend/all_models/llmapi.\n")
        _write(d / "1" / "model.yaml", header + yaml.safe_dump(data, sort_keys=False))
        _copy_template("llmapi/tensorrt_llm/1/model.py", d / "1" / "model.py")
        note = (f"LLM-API (PyTorch backend) serving {model_path} with tp {tp} x pp {pp}: one "
                f"tritonserver process; TensorRT-LLM starts the {tp * pp} GPU workers itself.")
        _write(tmp / LAUNCH_SCRIPT, _launch_script(repo, 1, note, [LLMAPI_CURL]),
               executable=True)
        info = {
            "generated_by": "build_engine (builders/triton_repo.py)",
            "target": "pytorch", "layout": "TensorRT-LLM triton_backend/all_models/llmapi",
            "model_repository": repo, "models": [TENSORRT_LLM], "model_dir": model_path,
            "tokenizer_dir": tokenizer_path or model_path, "tp_size": tp, "pp_size": pp,
            "world_size": tp * pp, "launch": launch_command(repo, 1), "requests": [LLMAPI_CURL],
            "trtllm_serve": trtllm_serve_command(model_path, tp=tp, pp=pp, options=opts,
                                                 llm_args=llm_args,
                                                 tokenizer_path=tokenizer_path),
            "external_paths": sorted(paths.external), "options": opts.as_dict(),
        }
        _write(tmp / REPO_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")

    return _atomic_repo(out_dir, opts, build)


def trtllm_serve_command(model_path: str, *, tp: int = 1, pp: int = 1, options=None,
                         llm_args: dict | None = None, tokenizer_path: str | None = None,
                         host: str = "0.0.0.0", port: int = 8000) -> list[str]:
    """``trtllm-serve`` (OpenAI-compatible server of current TensorRT-LLM) for the same model."""
    opts = TritonOptions.from_any(options)
    # no "serve" subcommand word: 1.x resolves an unknown first argument to serve, and releases
    # before the command group took the model as their first argument
    cmd = ["trtllm-serve", model_path, "--backend", "pytorch",
           "--tp_size", str(tp), "--pp_size", str(pp),
           "--kv_cache_free_gpu_memory_fraction", str(opts.kv_cache_free_gpu_mem_fraction),
           "--host", host, "--port", str(port)]
    if tokenizer_path and tokenizer_path != model_path:
        cmd += ["--tokenizer", tokenizer_path]
    for key in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width"):
        if llm_args and llm_args.get(key) is not None:
            cmd += [f"--{key}", str(llm_args[key])]
    return cmd


def llmapi_model_config(*, decoupled: bool) -> dict:
    """config.pbtxt of the LLM-API model. Upstream leaves max_batch_size and the transaction
    policy to model.yaml (set by auto_complete_config), but launch_triton_server.py starts
    tritonserver with --disable-auto-complete-config, so they are written here too, equal to
    model.yaml's triton_config (equal values do not conflict when auto-complete runs)."""
    s = lambda n, t, d, f="": (n, t, d, f)  # noqa: E731
    inputs = (
        s("text_input", "TYPE_STRING", [-1]), s("streaming", "TYPE_BOOL", [1], "o"),
        s("sampling_param_best_of", "TYPE_INT32", [1], "o"),
        s("sampling_param_temperature", "TYPE_FP32", [1], "o"),
        s("sampling_param_top_k", "TYPE_INT32", [1], "o"),
        s("sampling_param_top_p", "TYPE_FP32", [1], "o"),
        s("sampling_param_frequency_penalty", "TYPE_FP32", [1], "o"),
        s("sampling_param_presence_penalty", "TYPE_FP32", [1], "o"),
        s("sampling_param_max_tokens", "TYPE_INT32", [1], "o"),
        s("sampling_param_stop", "TYPE_STRING", [-1], "o"),
        s("sampling_param_seed", "TYPE_UINT64", [1], "o"),
        s("sampling_param_exclude_input_from_output", "TYPE_BOOL", [1], "o"),
        s("return_finish_reason", "TYPE_BOOL", [1], "o"),
        s("return_stop_reason", "TYPE_BOOL", [1], "o"),
        s("return_cumulative_logprob", "TYPE_BOOL", [1], "o"),
    )
    outputs = (s("text_output", "TYPE_STRING", [-1]), s("finish_reason", "TYPE_STRING", [-1]),
               s("stop_reason", "TYPE_STRING", [-1]), s("cumulative_logprob", "TYPE_FP32", [-1]))
    return {"name": TENSORRT_LLM, "backend": "python", "max_batch_size": 0,
            "model_transaction_policy": {"decoupled": decoupled},
            "instance_group": _cpu_instances(1),
            "input": [_tensor(t, "TYPE_FP32") for t in inputs],
            "output": [_tensor(t, "TYPE_FP32") for t in outputs]}


# --- validation ---------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$\{[^}]*\}?")


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


def _dims_fit(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _check_ensemble(name: str, ens, models: dict) -> None:
    pb2 = model_config_pb2()
    tname = lambda t: pb2.DataType.Name(t)  # noqa: E731
    where = f"{name}/config.pbtxt"
    tensors = {t.name: (t.data_type, list(t.dims), "ensemble input") for t in ens.input}
    steps = list(ens.ensemble_scheduling.step)
    if not steps:
        raise UserError(f"{where}: ensemble_scheduling has no steps")
    for i, step in enumerate(steps):  # every produced tensor first (steps need not be ordered)
        m = models.get(step.model_name)
        if m is None:
            raise UserError(f"{where}: step {i} uses model '{step.model_name}', which is not in "
                            f"the repository")
        outs = {t.name: t for t in m.output}
        for key, value in step.output_map.items():
            if key not in outs:
                raise UserError(f"{where}: step {i} maps output '{key}' of '{step.model_name}', "
                                f"which has no such output")
            if value in tensors:
                raise UserError(f"{where}: ensemble tensor '{value}' is produced twice")
            tensors[value] = (outs[key].data_type, list(outs[key].dims),
                              f"output {key} of {step.model_name}")
    used = set()
    for i, step in enumerate(steps):
        m = models[step.model_name]
        if m.max_batch_size < ens.max_batch_size:
            raise UserError(f"{where}: max_batch_size {ens.max_batch_size} exceeds that of "
                            f"'{step.model_name}' ({m.max_batch_size})")
        ins = {t.name: t for t in m.input}
        for key, value in step.input_map.items():
            if key not in ins:
                raise UserError(f"{where}: step {i} feeds input '{key}' of '{step.model_name}', "
                                f"which has no such input")
            if value not in tensors:
                raise UserError(f"{where}: step {i} reads tensor '{value}', which is neither an "
                                f"ensemble input nor produced by a step")
            dtype, dims, src = tensors[value]
            if dtype != ins[key].data_type:
                raise UserError(f"{where}: '{value}' ({src}) is {tname(dtype)} but input '{key}' "
                                f"of '{step.model_name}' is {tname(ins[key].data_type)}")
            if not _dims_fit(dims, list(ins[key].dims)):
                raise UserError(f"{where}: '{value}' ({src}) has dims {dims} but input '{key}' of "
                                f"'{step.model_name}' has dims {list(ins[key].dims)}")
            used.add(value)
        unfed = [t.name for t in m.input if not t.optional and t.name not in step.input_map]
        if unfed:
            raise UserError(f"{where}: required input(s) {', '.join(unfed)} of "
                            f"'{step.model_name}' are not fed by step {i}")
    for t in ens.input:
        if t.name not in used:
            raise UserError(f"{where}: ensemble input '{t.name}' is not used by any step")
    for t in ens.output:
        src = tensors.get(t.name)
        if src is None or src[2] == "ensemble input":
            raise UserError(f"{where}: ensemble output '{t.name}' is not produced by any step")
        if src[0] != t.data_type:
            raise UserError(f"{where}: ensemble output '{t.name}' is {tname(t.data_type)} but "
                            f"{src[2]} is {tname(src[0])}")


def validate_repo(path) -> dict:
    """Validate a Triton model repository; return {model name: ModelConfig message}.

    Every ``<model>/config.pbtxt`` is parsed with Triton's ModelConfig protobuf schema (from
    tritonclient); no ``${...}`` placeholder may remain; each model has a numeric version dir
    (with model.py for the Python backend), unique tensor names and a name matching its dir;
    ensemble steps must reference models, inputs and outputs that exist, with matching data
    types and shapes, feed every required input and use every ensemble input; a model.yaml
    (LLM-API) must use known keys only. Raises UserError with one line on the first problem.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected a Triton model repository)")
    models, dirs = {}, {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = d / "config.pbtxt"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: missing; every model directory needs a config.pbtxt")
        text = cfg_path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            m = None if line.lstrip().startswith("#") else _PLACEHOLDER.search(line)
            if m:
                raise UserError(f"{cfg_path}:{lineno}: unfilled template placeholder "
                                f"{m.group(0)}")
        cfg = parse_config(text, str(cfg_path))
        if cfg.name and cfg.name != d.name:
            raise UserError(f"{cfg_path}: name '{cfg.name}' differs from its directory "
                            f"'{d.name}'")
        if not cfg.backend and not cfg.platform:
            raise UserError(f"{cfg_path}: neither backend nor platform is set")
        versions = [v for v in d.iterdir() if v.is_dir() and v.name.isdigit()]
        if not versions:
            raise UserError(f"{d}: no version directory (e.g. {d.name}/1)")
        if cfg.backend == "python":
            for v in versions:
                if not (v / "model.py").is_file():
                    raise UserError(f"{v}: model.py missing (Python backend)")
        for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
            seen = set()
            for t in tensors:
                if t.name in seen:
                    raise UserError(f"{cfg_path}: {kind} '{t.name}' is declared twice")
                seen.add(t.name)
        for v in versions:
            yml = v / "model.yaml"
            if yml.is_file():
                import yaml

                try:
                    data = yaml.safe_load(yml.read_text(encoding="utf-8"))
                except yaml.YAMLError as e:
                    raise UserError(f"{yml}: not valid YAML ({' '.join(str(e).split())})") from None
                check_llmapi_model_yaml(data, str(yml), cfg)
        models[d.name] = cfg
        dirs[d.name] = d
    if not models:
        raise UserError(f"{root}: no model directories (expected e.g. ensemble/, tensorrt_llm/)")
    for name, cfg in models.items():
        if cfg.platform == "ensemble":
            _check_ensemble(name, cfg, models)
    return models
