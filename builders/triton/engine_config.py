"""What the Triton repository needs from an engine's config.json, read from the engine or
derived from the checkpoint config and the engine build options before the engines exist."""
from __future__ import annotations

from dataclasses import dataclass

from convert.errors import UserError

# trtllm-build's defaults in TensorRT-LLM 1.2 (BuildConfig), used when a value is not given
_BUILD_DEFAULTS = {"max_batch_size": 2048, "max_input_len": 1024, "max_seq_len": None,
                   "max_num_tokens": 8192, "max_beam_width": 1}
_LOGITS_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def build_option(options, name, default):
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
    build = {k: build_option(build_options, k, d) for k, d in _BUILD_DEFAULTS.items()}
    if build["max_seq_len"] is None:
        build["max_seq_len"] = _deduced_max_seq_len(checkpoint_config)
    plugin = {
        "paged_kv_cache": build_option(build_options, "paged_kv_cache", "enable") != "disable",
        "remove_input_padding":
            build_option(build_options, "remove_input_padding", "enable") != "disable",
        "gpt_attention_plugin": build_option(build_options, "gpt_attention_plugin", "auto"),
    }
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
        plugin=plugin, architecture=pre.get("architecture"), dtype=pre.get("dtype"))


def check_batching(engine: EngineInfo, strategy: str) -> None:
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


