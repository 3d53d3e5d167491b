"""The PyTorch target: TensorRT-LLM's ``triton_backend/all_models/llmapi`` layout."""
from __future__ import annotations

import json
import posixpath
from pathlib import Path

from builders.triton.engine_config import build_option
from builders.triton.launch import LLMAPI_CURL, launch_command, launch_script
from builders.triton.llmapi_schema import check_llmapi_model_yaml
from builders.triton.model_config import cpu_instances, render, tensor
from builders.triton.options import TritonOptions
from builders.triton.repo_files import (LAUNCH_SCRIPT, REPO_INFO, TENSORRT_LLM, ServePaths,
                                        check_tokenizer, copy_template, write_atomically,
                                        write_file)
from builders.triton.tokens import special_token_ids
from common.errors import UserError


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


def _check_world(tp, pp) -> None:
    for name, v in (("tp", tp), ("pp", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"--{name} must be a whole number >= 1 (got {v!r})")


def _llm_size_limits(options) -> dict:
    """LLM(...)'s size limits from the engine flags in ``options``, those that are set."""
    llm_args = {}
    for key in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width"):
        v = build_option(options if not isinstance(options, TritonOptions) else None, key, None)
        if v is not None:
            llm_args[key] = int(v)
    return llm_args


def _llm_args(options, paths) -> dict:
    """LLM(...)'s size limits, and with --lora TensorRT-LLM's LoraConfig (the adapters'
    directories as served)."""
    llm_args = _llm_size_limits(options)
    lora = build_option(options if not isinstance(options, TritonOptions) else None,
                        "lora_config", None)
    if lora:
        llm_args["lora_config"] = {**lora, "lora_dir": [paths.serve(d) for d in lora["lora_dir"]]}
    return llm_args


def write_llmapi_repo(out_dir, *, model_dir, tokenizer_dir=None, tp: int = 1, pp: int = 1,
                      options=None) -> Path:
    """Write the LLM-API (PyTorch backend) repository serving ``model_dir`` (a HF or unified
    quantized HF checkpoint) with ``tp`` x ``pp`` GPUs into ``out_dir``; returns ``out_dir``.

    LLM(...) size limits are taken from ``options`` when it has them (the engine flags
    ``--max-batch-size``, ``--max-num-tokens``, ``--max-seq-len``, ``--max-beam-width``, passed
    only when not None).
    """
    opts = TritonOptions.from_any(options).for_target("pytorch")
    _check_world(tp, pp)
    model = _check_hf_model_dir(model_dir)
    tok_dir = tokenizer_dir or opts.tokenizer_dir
    # LLM(...) loads the tokenizer from the model dir unless told otherwise: check it loads
    check_tokenizer(tok_dir or model, what="--tokenizer-dir" if tok_dir else "model dir")
    paths = ServePaths(Path(out_dir).expanduser().absolute(), opts.triton_model_root)
    model_path = paths.serve(model)
    tokenizer_path = paths.serve(tok_dir) if tok_dir is not None else None
    llm_args = _llm_args(options, paths)
    data = llmapi_model_yaml(model_path=model_path, tokenizer_path=tokenizer_path, tp=tp, pp=pp,
                             opts=opts, llm_args=llm_args)
    check_llmapi_model_yaml(data, "model.yaml")
    cfg = llmapi_model_config(decoupled=opts.decoupled)
    repo = paths.repo

    def build(tmp: Path) -> None:
        import yaml

        d = tmp / TENSORRT_LLM
        write_file(d / "config.pbtxt", render(cfg))
        header = ("# Written by build_engine (builders/triton). LLM-API arguments "
                  "(tensorrt_llm.LLM(**kwargs), all keys but triton_config)\n"
                  "# and triton_config, read by 1/model.py; see NVIDIA/TensorRT-LLM "
                  "triton_backend/all_models/llmapi.\n")
        write_file(d / "1" / "model.yaml", header + yaml.safe_dump(data, sort_keys=False))
        copy_template("llmapi/tensorrt_llm/1/model.py", d / "1" / "model.py")
        note = (f"LLM-API (PyTorch backend) serving {model_path} with tp {tp} x pp {pp}: one "
                f"tritonserver process; TensorRT-LLM starts the {tp * pp} GPU workers itself.")
        write_file(tmp / LAUNCH_SCRIPT, launch_script(
            repo, 1, note, [LLMAPI_CURL], required=(posixpath.join(model_path, "config.json"),),
            missing_hint="the model directory must be at this path on the serving host"),
               executable=True)
        info = {
            "generated_by": "build_engine (builders/triton)",
            "target": "pytorch", "layout": "TensorRT-LLM triton_backend/all_models/llmapi",
            "model_repository": repo, "models": [TENSORRT_LLM], "model_dir": model_path,
            "tokenizer_dir": tokenizer_path or model_path, "tp_size": tp, "pp_size": pp,
            "world_size": tp * pp, "launch": launch_command(repo, 1), "requests": [LLMAPI_CURL],
            # for people and tools: TensorRT-LLM's LLM reads the same from the model dir itself
            **special_token_ids(tok_dir or model),
            "trtllm_serve": trtllm_serve_command(model_path, tp=tp, pp=pp, options=opts,
                                                 llm_args=llm_args,
                                                 tokenizer_path=tokenizer_path),
            "external_paths": sorted(paths.external), "options": opts.as_dict(),
        }
        write_file(tmp / REPO_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")

    return write_atomically(out_dir, opts, build)


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
            "instance_group": cpu_instances(1),
            "input": [tensor(t, "TYPE_FP32") for t in inputs],
            "output": [tensor(t, "TYPE_FP32") for t in outputs]}


