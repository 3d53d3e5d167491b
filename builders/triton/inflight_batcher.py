"""The engine target: tensorrtllm_backend's ``all_models/inflight_batcher_llm`` layout."""
from __future__ import annotations

import json
import posixpath
from pathlib import Path

from builders.triton import lora
from builders.triton.engine_config import EngineInfo, check_batching, read_engine_config
from builders.triton.launch import (ENGINE_CURL, ENGINE_CURL_STREAM, launch_command,
                                    launch_script, slurm_launch_command)
from builders.triton.model_config import (cpu_instances, dynamic_batching, pb_bool, render,
                                          string_params, tensor)
from builders.triton.options import TritonOptions
from builders.triton.repo_files import (BLS, ENSEMBLE, LAUNCH_SCRIPT, POSTPROCESSING,
                                        PREPROCESSING, REPO_INFO, TENSORRT_LLM, ServePaths,
                                        check_tokenizer, copy_template, copy_tokenizer,
                                        write_atomically, write_file)
from builders.triton.tokens import special_token_ids
from common.errors import UserError

# upstream's default location of the orchestrator-mode worker inside the Triton TRT-LLM container
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"

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


def engine_model_configs(*, engine: EngineInfo, opts: TritonOptions, engine_path: str,
                         tokenizer_path: str, batch: int, tokens: dict | None = None,
                         lora_adapters: int = 0, lora_dir: str | None = None) -> dict[str, dict]:
    """The config dicts (ModelConfig field names) of the engine repository's models; ``tokens``:
    :func:`builders.triton.tokens.special_token_ids` of the model (the preprocessing model's
    defaults for END_ID / PAD_ID and its default stop words)."""
    tokens = tokens or {"end_id": -1, "pad_id": 0, "stop_token_ids": []}
    lt = engine.logits_type
    cfgs = {PREPROCESSING: _preprocessing(engine, opts, tokenizer_path, batch, tokens),
            TENSORRT_LLM: _tensorrt_llm(engine, opts, engine_path, tokenizer_path, batch,
                                        (lora_adapters, lora_dir)),
            POSTPROCESSING: _postprocessing(lt, opts, tokenizer_path, batch),
            ENSEMBLE: _ensemble(lt, batch, _CLIENT_INPUTS + lora.client_inputs(engine))}
    if opts.triton_bls:
        cfgs[BLS] = _bls(lt, opts, batch, _CLIENT_INPUTS + lora.client_inputs(engine))
    return cfgs


def _preprocessing(engine: EngineInfo, opts: TritonOptions, tokenizer_path: str, batch: int,
                   tokens: dict) -> dict:
    lt = engine.logits_type
    return {
        "name": PREPROCESSING, "backend": "python", "max_batch_size": batch,
        "dynamic_batching": dynamic_batching(batch, opts),
        "input": [tensor(t, lt) for t in _PRE_INPUTS],
        "output": [tensor(t, lt) for t in _PRE_OUTPUTS],
        "instance_group": cpu_instances(opts.triton_instance_count),
        "parameters": string_params({
            "tokenizer_dir": tokenizer_path, "add_special_tokens": "true",
            "max_input_len": engine.max_input_len or 0, "trust_remote_code": "false",
            "end_id": tokens["end_id"], "pad_id": tokens["pad_id"],
            "stop_token_ids": json.dumps(tokens["stop_token_ids"])}),
    }


def _tensorrt_llm(engine: EngineInfo, opts: TritonOptions, engine_path: str, tokenizer_path: str,
                  batch: int, lora_adapters: tuple = (0, None)) -> dict:
    lt = engine.logits_type
    llm_params = {
        "gpt_model_type": opts.batching_strategy,
        "gpt_model_path": engine_path,
        "max_beam_width": engine.max_beam_width,
        "batch_scheduler_policy": opts.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": opts.kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": pb_bool(opts.enable_kv_cache_reuse),
        "enable_chunked_context": pb_bool(opts.enable_chunked_context),
        "exclude_input_in_output": pb_bool(opts.exclude_input_in_output),
        "normalize_log_probs": "true",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": EXECUTOR_WORKER,
        # Read without a fallback by the C++ backend (getGuidedDecodingConfigFromParams in
        # inflight_batcher_llm/src/model_instance_state.cc): they must be present; empty = off.
        "tokenizer_dir": tokenizer_path,
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
    }
    if engine.attention_windows:
        # one KV window per layer (Gemma's sliding layers): the C++ backend reads a comma-separated
        # list (model_instance_state.cc getKvCacheConfigFromParams, GetParameter<std::vector<int32_t>>)
        llm_params["max_attention_window_size"] = ",".join(map(str, engine.attention_windows))
    llm_params.update(lora.cache_params(engine, *lora_adapters))
    inputs = [t if t[0] != "lora_weights" else (t[0], lora.weights_type(engine), *t[2:])
              for t in _TRTLLM_INPUTS]
    return {
        "name": TENSORRT_LLM, "backend": "tensorrtllm", "max_batch_size": batch,
        "model_transaction_policy": {"decoupled": opts.decoupled},
        "dynamic_batching": dynamic_batching(batch, opts),
        "input": [tensor(t, lt) for t in inputs],
        "output": [tensor(t, lt) for t in _TRTLLM_OUTPUTS],
        "instance_group": cpu_instances(1),
        "parameters": string_params(llm_params),
    }


def _postprocessing(lt, opts: TritonOptions, tokenizer_path: str, batch: int) -> dict:
    return {
        "name": POSTPROCESSING, "backend": "python", "max_batch_size": batch,
        "dynamic_batching": {},
        "input": [tensor(t, lt) for t in _POST_INPUTS],
        "output": [tensor(t, lt) for t in _POST_OUTPUTS],
        "instance_group": cpu_instances(opts.triton_instance_count),
        "parameters": string_params({"tokenizer_dir": tokenizer_path, "skip_special_tokens": "true",
                                     "trust_remote_code": "false"}),
    }


def _ensemble(lt, batch: int, client=_CLIENT_INPUTS) -> dict:
    """preprocessing -> tensorrt_llm -> postprocessing, the client's tensors routed to each step."""
    pre_step = {"model_name": PREPROCESSING, "model_version": -1, "input_map": {},
                "output_map": {o[0]: "_" + o[0] for o in _PRE_OUTPUTS}}
    llm_step = {"model_name": TENSORRT_LLM, "model_version": -1,
                "input_map": {llm: "_" + pre for pre, llm in _PRE_TO_LLM},
                "output_map": {"output_ids": "_TOKENS_BATCH",
                               "sequence_length": "_SEQUENCE_LENGTH"}}
    for name, _, _, _, (model, key) in client:
        (pre_step if model == "pre" else llm_step)["input_map"][key] = name
    for t in _RESULT_OUTPUTS + _PERF_OUTPUTS:
        llm_step["output_map"][t[0]] = t[0]
    post_step = {"model_name": POSTPROCESSING, "model_version": -1,
                 "input_map": {"TOKENS_BATCH": "_TOKENS_BATCH",
                               "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
                 "output_map": {"OUTPUT": "text_output"}}
    return {
        "name": ENSEMBLE, "platform": "ensemble", "max_batch_size": batch,
        "input": [tensor(t, lt) for t in client],
        "output": [tensor(t, lt) for t in _CLIENT_OUTPUTS],
        "ensemble_scheduling": {"step": [pre_step, llm_step, post_step]},
    }


def _bls(lt, opts: TritonOptions, batch: int, client=_CLIENT_INPUTS) -> dict:
    return {
        "name": BLS, "backend": "python", "max_batch_size": batch,
        "model_transaction_policy": {"decoupled": opts.decoupled},
        "input": [tensor(t, lt) for t in client],
        "output": [tensor(t, lt) for t in _CLIENT_OUTPUTS],
        "instance_group": cpu_instances(opts.triton_instance_count),
        "parameters": string_params({
            "preprocessing_model_name": PREPROCESSING,
            "tensorrt_llm_model_name": TENSORRT_LLM,
            "postprocessing_model_name": POSTPROCESSING,
            # BLS tensor name -> (model, that model's tensor name), read by its model.py
            "input_routes": json.dumps({n: list(r) for n, _, _, _, r in client},
                                       sort_keys=True)}),
    }


def write_engine_repo(out_dir, *, engine_dir, tokenizer_dir, engine_config: dict | None,
                      options=None, lora_adapters: int = 0, lora_dir=None) -> Path:
    """Write the filled inflight_batcher_llm repository for ``engine_dir`` into ``out_dir``.

    ``engine_config``: the engine's config.json as a dict, or :func:`engine_config_from_checkpoint`
    of the checkpoint config and build options when the engines are not built yet (a bare
    checkpoint config.json is accepted too); None reads ``engine_dir/config.json``.
    ``options``: TritonOptions, or the CLI Namespace.
    Returns ``out_dir``. Raises UserError (one line) for bad inputs.
    """
    opts = TritonOptions.from_any(options).for_target("engine")
    engine = read_engine_config(engine_config if engine_config is not None
                                else _built_engine_config(engine_dir))
    check_batching(engine, opts.batching_strategy)
    tok_dir = check_tokenizer(tokenizer_dir or opts.tokenizer_dir, engine.vocab_size)
    batch = opts.triton_max_batch_size or min(64, engine.max_batch_size)
    paths = ServePaths(Path(out_dir).expanduser().absolute(), opts.triton_model_root)
    engine_path = paths.serve(engine_dir)
    if opts.triton_copy_tokenizer:
        tokenizer_path = paths.serve(paths.out_dir / PREPROCESSING / "1" / "tokenizer")
    else:
        tokenizer_path = paths.serve(tok_dir)
    tokens = special_token_ids(tok_dir)
    cfgs = engine_model_configs(engine=engine, opts=opts, engine_path=engine_path,
                                tokenizer_path=tokenizer_path, batch=batch, tokens=tokens,
                                lora_adapters=lora_adapters,
                                lora_dir=paths.serve(lora_dir) if lora_adapters else None)
    repo = paths.repo

    def build(tmp: Path) -> None:
        for name, cfg in cfgs.items():
            write_file(tmp / name / "config.pbtxt", render(cfg))
            (tmp / name / "1").mkdir(parents=True, exist_ok=True)
        for name in (PREPROCESSING, POSTPROCESSING) + ((BLS,) if opts.triton_bls else ()):
            copy_template(f"engine/{name}/1/model.py", tmp / name / "1" / "model.py")
        if opts.triton_copy_tokenizer:
            copy_tokenizer(tok_dir, tmp / PREPROCESSING / "1" / "tokenizer")
        requests = [ENGINE_CURL] + ([ENGINE_CURL_STREAM] if opts.decoupled else [])
        note = (f"Engines: {engine_path} (world size {engine.world_size} = tp {engine.tp} x "
                f"pp {engine.pp}: one tritonserver process per rank).")
        script = launch_script(
            repo, engine.world_size, note, requests,
            required=(posixpath.join(engine_path, "config.json"),),
            rank_file=posixpath.join(engine_path, "rank{rank}.engine"),
            missing_hint="build the engines first (build_engine --from-checkpoint on a GPU host "
                         "with TensorRT-LLM <= 1.2)")
        write_file(tmp / LAUNCH_SCRIPT, script, executable=True)
        info = _repo_info(engine, opts, repo, cfgs, engine_path, tokenizer_path, batch, tokens,
                          requests, paths)
        write_file(tmp / REPO_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")

    return write_atomically(out_dir, opts, build)


def _built_engine_config(engine_dir) -> dict:
    """The engines exist already: their config.json."""
    cfg_path = Path(engine_dir) / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path}: cannot read the engine config ({e}); build the engines "
                        f"first or pass the checkpoint config") from None


def _repo_info(engine: EngineInfo, opts: TritonOptions, repo, cfgs: dict, engine_path: str,
               tokenizer_path: str, batch: int, tokens: dict, requests: list, paths) -> dict:
    """triton_repo.json: what was written and how to launch it."""
    return {
        "generated_by": "build_engine (builders/triton)",
        "target": "engine", "layout": "tensorrtllm_backend all_models/inflight_batcher_llm",
        "model_repository": repo, "models": sorted(cfgs),
        "engine_dir": engine_path, "tokenizer_dir": tokenizer_path,
        "world_size": engine.world_size, "tp_size": engine.tp, "pp_size": engine.pp,
        "architecture": engine.architecture, "dtype": engine.dtype,
        "triton_max_batch_size": batch, "engine_max_batch_size": engine.max_batch_size,
        "max_input_len": engine.max_input_len, "max_seq_len": engine.max_seq_len,
        "logits_datatype": engine.logits_type, **tokens,
        "launch": launch_command(repo, engine.world_size),
        "launch_slurm": slurm_launch_command(repo, engine.world_size),
        "requests": requests, "external_paths": sorted(paths.external),
        "options": opts.as_dict(),
    }
