"""The per-rank engine worker: ``python -m builders.engine_worker --rank R ...``, one process per
rank, the only place where tensorrt_llm is imported.

It makes the calls trtllm-build makes for one rank (tensorrt_llm/commands/build.py):
``PluginConfig.from_arguments`` with the plugin flags under their trtllm-build names and values
("enable"/"disable", "auto"/dtype), a ``BuildConfig`` with the size limits and the KV cache type,
``PretrainedConfig.from_json_file``, ``build_model(build_config, rank, checkpoint_dir,
model_config, use_fused_mlp=...)`` and ``engine.save``.

``BuildConfig`` changed shape between releases, so the form is chosen by looking at the installed
class (never by trying one and catching the error):

- pydantic model (1.2, NVIDIA/TensorRT-LLM PR #8330; it has ``model_fields``): constructed
  directly, ``BuildConfig(max_input_len=..., ..., kv_cache_type=..., plugin_config=...)``, as
  1.2's trtllm-build does; the ``KVCacheType`` enum is the one its ``kv_cache_type`` field is
  annotated with (1.2 has a Python wrapper enum);
- dataclass (1.0/1.1): ``BuildConfig.from_dict(dict, plugin_config=...)`` then
  ``update_from_dict({"kv_cache_type": tensorrt_llm.bindings.KVCacheType.X})``, as that
  trtllm-build did.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
import typing

from builders.engine_options import BUILD_KEYS, PLUGIN_KEYS

#: PluginConfig's LoRA field (set only with --lora; builders.engine_options.trtllm_build_args)
LORA_PLUGIN = ("lora_plugin",)

# Passed as trtllm-build passes them: no opt_num_tokens (its default), strongly typed, and no
# timing-cache file (trtllm-build would drop model.cache into the working directory).
_FIXED = {"opt_num_tokens": None, "strongly_typed": True, "input_timing_cache": None,
          "output_timing_cache": None}


def is_pydantic_build_config(build_config_cls) -> bool:
    return isinstance(getattr(build_config_cls, "model_fields", None), dict)


def kv_cache_type_member(enum_holder, name: str):
    """``KVCacheType.PAGED`` etc. from a class or a (possibly Optional[...]) annotation."""
    member = name.upper()
    candidates = [enum_holder] + list(typing.get_args(enum_holder))
    for c in candidates:
        if isinstance(c, type) and hasattr(c, member):
            return getattr(c, member)
    raise TypeError(f"no KVCacheType with a member {member} in {enum_holder!r}")


def make_build_config(build_config_cls, sizes: dict, kv_cache_type: str, plugin_config):
    """The BuildConfig for ``sizes`` (BUILD_KEYS minus kv_cache_type), in the installed form."""
    if is_pydantic_build_config(build_config_cls):
        model_fields = build_config_cls.model_fields
        kwargs = dict(sizes)  # unknown size fields must fail loudly, not be dropped
        kwargs.update({k: v for k, v in _FIXED.items()
                       if k in model_fields and (v is not None or _accepts_none(model_fields[k]))})
        kwargs["kv_cache_type"] = kv_cache_type_member(
            model_fields["kv_cache_type"].annotation, kv_cache_type)
        return build_config_cls(plugin_config=plugin_config, **kwargs)
    build_config = build_config_cls.from_dict(dict(sizes, **_FIXED), plugin_config=plugin_config)
    from tensorrt_llm.bindings import KVCacheType

    build_config.update_from_dict(
        {"kv_cache_type": kv_cache_type_member(KVCacheType, kv_cache_type)})
    return build_config


def _accepts_none(field) -> bool:
    annotation = getattr(field, "annotation", None)
    return annotation is None or type(None) in typing.get_args(annotation)


def lora_config(args: dict):
    """BuildConfig.lora_config as trtllm-build makes it (tensorrt_llm/commands/build.py): no
    lora_dir (adapters come per request, so no modules_to_save is written into the engine), the
    target modules and the largest rank. build_model calls ``model.use_lora(lora_config)`` when
    the plugin is set, which adds the missing q/k/v modules."""
    from tensorrt_llm.lora_manager import LoraConfig

    return LoraConfig(lora_dir=[], lora_ckpt_source="hf", max_lora_rank=args["max_lora_rank"],
                      lora_target_modules=list(args["lora_target_modules"]))


def build_one_rank(rank: int, checkpoint_dir: str, output_dir: str, trtllm_args: dict) -> None:
    import tensorrt_llm
    from tensorrt_llm.builder import BuildConfig
    from tensorrt_llm.commands.build import build_model
    from tensorrt_llm.logger import logger
    from tensorrt_llm.models import PretrainedConfig
    from tensorrt_llm.plugin import PluginConfig

    args = dict(trtllm_args)
    logger.set_level(args.pop("log_level", "info"))
    form = "pydantic" if is_pydantic_build_config(BuildConfig) else "from_dict"
    print(f"[builders.engine] rank {rank}: TensorRT-LLM {tensorrt_llm.__version__} "
          f"(BuildConfig: {form}), args {json.dumps(args, sort_keys=True)}", flush=True)

    # Plugin flags keep trtllm-build's string values: PluginConfig turns "enable"/"disable"
    # into booleans / None itself.
    plugin_config = PluginConfig.from_arguments(
        argparse.Namespace(**{k: args[k] for k in PLUGIN_KEYS + LORA_PLUGIN if k in args}))
    plugin_config.validate()
    sizes = {k: args.get(k) for k in BUILD_KEYS if k != "kv_cache_type"}
    build_config = make_build_config(BuildConfig, sizes, args.get("kv_cache_type", "paged"),
                                     plugin_config)
    if args.get("lora_plugin") is not None:
        build_config.lora_config = lora_config(args)
    model_config = PretrainedConfig.from_json_file(os.path.join(checkpoint_dir, "config.json"))

    # trtllm-build turns the fused MLP off in build_model's kwargs for quantized checkpoints
    # other than FP8 / mixed precision.
    quant = getattr(getattr(model_config, "quantization", None), "quant_algo", None)
    use_fused_mlp = args.get("use_fused_mlp") == "enable" and (
        not quant or quant in ("FP8", "MIXED_PRECISION"))
    engine = build_model(build_config, rank, checkpoint_dir, model_config,
                         use_fused_mlp=use_fused_mlp)
    if engine is None:
        raise RuntimeError("build_model returned no engine")
    engine.save(output_dir)
    print(f"[builders.engine] rank {rank}: saved to {output_dir}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m builders.engine_worker",
                                description="Build one rank's TensorRT engine (internal worker "
                                            "of build_engine; one process per rank).")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--trtllm-args", required=True, help="JSON: trtllm-build option → value")
    a = p.parse_args(argv)
    home = os.getcwd()
    try:
        # a scratch working directory: whatever TensorRT-LLM drops into the cwd (a timing cache
        # where the installed BuildConfig cannot be told not to write one) goes with it
        with tempfile.TemporaryDirectory(prefix=f"trtllm-rank{a.rank}-") as scratch:
            os.chdir(scratch)
            try:
                build_one_rank(a.rank, os.path.abspath(os.path.join(home, a.checkpoint_dir)),
                               os.path.abspath(os.path.join(home, a.output_dir)),
                               json.loads(a.trtllm_args))
            finally:
                os.chdir(home)
    except BaseException:  # noqa: BLE001 - the traceback goes to the rank log, the status out
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
