"""What the Triton repository needs from an engine's config.json, read from the engine or
derived from the checkpoint config and the engine build options before the engines exist."""
from __future__ import annotations

from dataclasses import dataclass

from builders.engine_options import deduced_max_seq_len
from common.errors import UserError

from .lora import lora_info
from model.families.gemma import trtllm_windows

# trtllm-build's defaults in TensorRT-LLM 1.2 (BuildConfig), used when a value is not given
_BUILD_DEFAULTS = {"max_batch_size": 2048, "max_input_len": 1024, "max_seq_len": None,
                   "max_num_tokens": 8192, "max_beam_width": 1}
# The C++ tensorrtllm backend returns logits as FP32 or FP16 only (model_instance_state.cc throws
# "Logits type is not supported" otherwise), so a bfloat16 engine has no Triton data type here.
_LOGITS_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def build_option(options, name, default):
    if options is None:
        return default
    if isinstance(options, dict):
        value = options.get(name, default)
    else:
        value = getattr(options, name, default)
    return default if value is None else value


def _paged_kv_cache(build_options) -> bool:
    """TensorRT-LLM 1.2 spells it --kv_cache_type paged|continuous|disabled; older releases
    --paged_kv_cache enable|disable. Either option name is read."""
    kv_type = build_option(build_options, "kv_cache_type", None)
    if kv_type is not None:
        return str(kv_type).lower() == "paged"
    return build_option(build_options, "paged_kv_cache", "enable") != "disable"


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
    build = {k: build_option(build_options, k, d) for k, d in _BUILD_DEFAULTS.items()}
    if build["max_seq_len"] is None:
        build["max_seq_len"] = deduced_max_seq_len(checkpoint_config)
    # trtllm-build clips a longer max_input_len to max_seq_len (with a warning)
    build["max_input_len"] = min(int(build["max_input_len"]), int(build["max_seq_len"]))
    plugin = {
        "paged_kv_cache": _paged_kv_cache(build_options),
        "remove_input_padding":
            build_option(build_options, "remove_input_padding", "enable") != "disable",
        "gpt_attention_plugin": build_option(build_options, "gpt_attention_plugin", "auto"),
    }
    lora = build_option(build_options, "lora_plugin", None)
    if lora:  # as trtllm-build writes a LoRA engine's config.json
        plugin["lora_plugin"] = lora
        build["lora_config"] = {
            "max_lora_rank": build_option(build_options, "max_lora_rank", 64),
            "lora_target_modules": list(build_option(build_options, "lora_target_modules", ()))}
    build["plugin_config"] = plugin
    return {"version": None, "pretrained_config": checkpoint_config, "build_config": build}


@dataclass(frozen=True)
class EngineInfo:
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
    #: per layer, the KV window the engine must run with (``max_attention_window_size``); None:
    #: every layer attends to the whole sequence (no parameter written)
    attention_windows: tuple[int, ...] | None = None
    #: the LoRA plugin's settings (builders.triton.lora.lora_info); None: no LoRA
    lora: dict | None = None


def read_engine_config(engine_config: dict) -> EngineInfo:
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
    if logits_dtype == "bfloat16":
        raise UserError("engine config: logits_dtype bfloat16 cannot be served by Triton's "
                        "tensorrtllm backend (float32 or float16 logits only); convert the "
                        "checkpoint with logits_dtype float32")
    if logits_dtype not in _LOGITS_TYPES:
        raise UserError(f"engine config: logits_dtype {logits_dtype!r} is not one of "
                        f"{', '.join(_LOGITS_TYPES)}")
    plugin = build.get("plugin_config") or {}
    max_batch = int(build.get("max_batch_size") or _BUILD_DEFAULTS["max_batch_size"])
    return EngineInfo(
        tp=tp, pp=pp, world_size=world, logits_type=_LOGITS_TYPES[logits_dtype],
        vocab_size=pre.get("vocab_size"), max_batch_size=max_batch,
        max_beam_width=int(build.get("max_beam_width") or 1),
        max_input_len=build.get("max_input_len"), max_seq_len=build.get("max_seq_len"),
        plugin=plugin, architecture=pre.get("architecture"), dtype=pre.get("dtype"),
        attention_windows=_windows(pre, build.get("max_seq_len")),
        lora=lora_info(pre, build, plugin))


def _windows(pre: dict, max_seq_len) -> tuple[int, ...] | None:
    """The per-layer windows of a model with sliding-window layers (Gemma 2/3,
    ``model.families.gemma.trtllm_windows``), full layers at ``max_seq_len``, a sliding window
    no longer than it: the engine takes them at run time, not from its config."""
    if "num_hidden_layers" not in pre:
        return None
    windows = trtllm_windows(pre)
    if all(w is None for w in windows):
        return None
    if not max_seq_len:
        raise UserError("engine config: a model with sliding-window layers needs the engine's "
                        "max_seq_len to write max_attention_window_size; pass --max-seq-len")
    top = int(max_seq_len)
    return tuple(top if w is None else min(int(w), top) for w in windows)


def check_batching(engine: EngineInfo, strategy: str) -> None:
    """In-flight batching needs what trtllm-build enables by default (an engine built without
    them would need the deprecated V1 static batching, which is not offered)."""
    missing = []
    p = engine.plugin
    if p.get("paged_kv_cache") is False:
        missing.append("a paged KV cache (--kv-cache-type paged)")
    if p.get("remove_input_padding") is False:
        missing.append("--remove-input-padding enable")
    if p.get("gpt_attention_plugin") in ("disable", None) and "gpt_attention_plugin" in p:
        missing.append("--gpt-attention-plugin auto")
    if missing:
        raise UserError(f"--batching-strategy {strategy} needs an engine built with "
                        f"{', '.join(missing)}; rebuild the engines with it")


