"""The engine options: trtllm-build's flags (names, 1.2 defaults, checks) and what of them reaches
TensorRT-LLM for each rank, plus ``--ranks``.

Defaults are those of trtllm-build in TensorRT-LLM 1.2 (BuildConfig / PluginConfig fields).
They are always passed explicitly, so the same flags give the same engine on every supported
release, whose own defaults differ.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import asdict, dataclass, fields

from common.errors import UserError

_PLUGIN_DTYPES = ("auto", "float16", "bfloat16", "float32", "disable")
_GEMM_CHOICES = ("auto", "float16", "bfloat16", "float32", "int32", "fp8", "nvfp4", "disable")
_ONOFF = ("enable", "disable")
_LOG_LEVELS = ("internal_error", "error", "warning", "info", "verbose", "debug", "trace")
KV_CACHE_TYPES = ("paged", "continuous", "disabled")  # trtllm-build --kv_cache_type (KVCacheType)

# Where each option goes in TensorRT-LLM: BuildConfig ("build"), PluginConfig ("plugin"), the
# TRT-LLM logger ("logger"), or nowhere, used by this stage only ("local").
_BUILD, _PLUGIN, _LOGGER, _LOCAL = "build", "plugin", "logger", "local"

# What trtllm-build does without --max_seq_len (tensorrt_llm/builder.py, _init_max_seq_len):
# max_position_embeddings (2048 when the config has none) times the rope scaling factor, except
# for the kinds whose factor does not stretch the context (su, longrope, llama3), rounded up.
_UNSCALED_ROPE = ("su", "longrope", "llama3")
_MAX_SEQ_LEN_HELP = (
    "maximum total length (prompt + output) of one request (default: deduced by TensorRT-LLM "
    "from the checkpoint: max_position_embeddings, times the rope scaling factor for linear/"
    "dynamic/yarn scaling, not for llama3/longrope/su scaling; a longer --max-input-len is "
    "clipped to it)")


@dataclass(frozen=True)
class _Spec:
    name: str                       # = trtllm-build's option name (dest); CLI flag uses dashes
    kind: type
    default: object
    target: str
    help: str
    choices: tuple | None = None
    optional: bool = False          # None allowed (meaning: not passed, TRT-LLM decides)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTION_SPECS: tuple[_Spec, ...] = (
    _Spec("max_batch_size", int, 2048, _BUILD,
          "maximum number of requests the engine can schedule at once"),
    _Spec("max_input_len", int, 1024, _BUILD, "maximum prompt length of one request"),
    _Spec("max_seq_len", int, None, _BUILD, _MAX_SEQ_LEN_HELP, optional=True),
    _Spec("max_num_tokens", int, 8192, _BUILD,
          "maximum number of batched input tokens per step after padding removal"),
    _Spec("max_beam_width", int, 1, _BUILD, "maximum beam width for beam search"),
    _Spec("kv_cache_type", str, "paged", _BUILD,
          "KV cache layout: paged (needed by Triton's in-flight batching), continuous, or "
          "disabled (context phase only); trtllm-build's --kv_cache_type", KV_CACHE_TYPES),
    _Spec("gpt_attention_plugin", str, "auto", _PLUGIN,
          "attention plugin dtype ('auto' = the checkpoint dtype)", _PLUGIN_DTYPES),
    _Spec("gemm_plugin", str, None, _PLUGIN,
          "cuBLASLt GEMM plugin for the non-quantized GEMMs ('fp8' needs an FP8 checkpoint; "
          "default: not set, TensorRT-LLM's own choice, i.e. off except for NVFP4)",
          _GEMM_CHOICES, optional=True),
    _Spec("gemm_swiglu_plugin", str, "disable", _PLUGIN,
          "fused GEMM+SwiGLU for the gated MLP: FP8 checkpoints on Hopper only, needs "
          "--use-fused-mlp enable", ("fp8", "disable")),
    _Spec("low_latency_gemm_plugin", str, "disable", _PLUGIN,
          "low-latency GEMM plugin: FP8 checkpoints only", ("fp8", "disable")),
    _Spec("remove_input_padding", str, "enable", _PLUGIN, "pack the tokens of a batch together",
          _ONOFF),
    _Spec("context_fmha", str, "enable", _PLUGIN, "fused multi-head attention in the context "
          "phase", _ONOFF),
    _Spec("use_paged_context_fmha", str, "enable", _PLUGIN, "paged context FMHA (KV-cache reuse, "
          "chunked context; turned off by TensorRT-LLM for an INT8 KV cache)", _ONOFF),
    _Spec("use_fp8_context_fmha", str, "enable", _PLUGIN, "FP8 context FMHA: takes effect only "
          "for FP8/W4A8_AWQ/NVFP4 checkpoints on SM>=89, ignored otherwise", _ONOFF),
    _Spec("use_fused_mlp", str, "enable", _PLUGIN, "fuse the two GEMMs of the gated MLP "
          "(TensorRT-LLM applies it to unquantized and FP8 checkpoints)", _ONOFF),
    _Spec("multiple_profiles", str, "disable", _PLUGIN, "several TensorRT optimization "
          "profiles (longer build, faster without the GEMM plugin)", _ONOFF),
    _Spec("log_level", str, "info", _LOGGER, "TensorRT-LLM log level in the rank logs",
          _LOG_LEVELS),
    _Spec("build_workers", int, 1, _LOCAL, "ranks built at once, one GPU each (capped at the "
          "number of visible GPUs); build_engine's default: its --workers"),
)
SPECS = {s.name: s for s in OPTION_SPECS}
PLUGIN_KEYS = tuple(s.name for s in OPTION_SPECS if s.target == _PLUGIN)
BUILD_KEYS = tuple(s.name for s in OPTION_SPECS if s.target == _BUILD)
_LEGACY_PAGED = {"enable": "paged", "disable": "continuous"}


@dataclass(frozen=True)
class EngineOptions:
    """Every engine option, named as trtllm-build names it (``--build-workers`` excepted)."""

    max_batch_size: int = 2048
    max_input_len: int = 1024
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    max_beam_width: int = 1
    kv_cache_type: str = "paged"
    gpt_attention_plugin: str = "auto"
    gemm_plugin: str | None = None
    gemm_swiglu_plugin: str = "disable"
    low_latency_gemm_plugin: str = "disable"
    remove_input_padding: str = "enable"
    context_fmha: str = "enable"
    use_paged_context_fmha: str = "enable"
    use_fp8_context_fmha: str = "enable"
    use_fused_mlp: str = "enable"
    multiple_profiles: str = "disable"
    log_level: str = "info"
    build_workers: int = 1
    #: LoRA (set from --lora's adapters by pipeline.lora, never a flag of their own): the LoRA
    #: plugin's dtype (the engine's), BuildConfig.lora_config's lora_target_modules (TensorRT-LLM
    #: module names) and max_lora_rank; None / (): no LoRA plugin
    lora_plugin: str | None = None
    lora_target_modules: tuple = ()
    max_lora_rank: int | None = None

    @property
    def paged_kv_cache(self) -> str:
        """The deprecated spelling, for readers of trtllm-build's older plugin flag."""
        return "enable" if self.kv_cache_type == "paged" else "disable"

    @classmethod
    def from_any(cls, options) -> "EngineOptions":
        """From an EngineOptions, a mapping or an argparse Namespace (unknown names ignored).
        The deprecated ``paged_kv_cache`` (enable|disable) is read as ``kv_cache_type``."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            opts = options
        else:
            src = dict(vars(options) if isinstance(options, argparse.Namespace) else options)
            legacy = src.pop("paged_kv_cache", None)
            if legacy is not None:
                _merge_legacy_paged(src, legacy)
            opts = cls(**{f.name: src[f.name] for f in fields(cls) if f.name in src})
        opts.validate()
        return opts

    def validate(self) -> None:
        for spec in OPTION_SPECS:
            value = getattr(self, spec.name)
            if value is None and spec.optional:
                continue
            if spec.kind is int:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise UserError(f"{spec.flag} must be a whole number >= 1 (got {value!r})")
            elif spec.choices is not None and value not in spec.choices:
                raise UserError(f"{spec.flag} must be one of {', '.join(spec.choices)} "
                                f"(got {value!r})")
        self._validate_lora()
        if self.gemm_swiglu_plugin == "fp8" and self.use_fused_mlp != "enable":
            raise UserError("--gemm-swiglu-plugin fp8 needs --use-fused-mlp enable "
                            "(TensorRT-LLM refuses the GEMM+SwiGLU plugin without the fused MLP)")

    def _validate_lora(self) -> None:
        """The settings TensorRT-LLM's LoRA plugin needs: packed input and a paged KV cache
        (the in-flight batcher's per-request adapters), a float plugin dtype."""
        if self.lora_plugin is None:
            return
        if self.lora_plugin not in ("float16", "bfloat16", "float32"):
            raise UserError(f"the LoRA plugin dtype must be the engine's float16, bfloat16 or "
                            f"float32 (got {self.lora_plugin!r})")
        if self.kv_cache_type != "paged" or self.remove_input_padding != "enable":
            raise UserError("--lora needs --kv-cache-type paged and --remove-input-padding enable "
                            "(per-request adapters are served by the in-flight batcher)")

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.lora_plugin is None:  # the options of a run without LoRA read as before
            for k in ("lora_plugin", "lora_target_modules", "max_lora_rank"):
                out.pop(k)
        return out

    def cli_flags(self, only_changed: bool = True) -> list[str]:
        """``--flag value`` pairs for build_engine (by default only those that differ from the
        defaults, which is enough to reproduce these options)."""
        out = []
        for spec in OPTION_SPECS:
            value = getattr(self, spec.name)
            if value is None or (only_changed and value == spec.default):
                continue
            out += [spec.flag, str(value)]
        if self.lora_plugin is not None:  # --from-checkpoint's LoRA flags (trtllm-build's)
            out += ["--lora-plugin", self.lora_plugin, "--max-lora-rank", str(self.max_lora_rank),
                    "--lora-target-modules", *self.lora_target_modules]
        return out


def _merge_legacy_paged(src: dict, legacy) -> None:
    if legacy not in _LEGACY_PAGED:
        raise UserError(f"--paged-kv-cache must be one of enable, disable (got {legacy!r}); it is "
                        "the deprecated spelling of --kv-cache-type paged|continuous")
    wanted = _LEGACY_PAGED[legacy]
    given = src.get("kv_cache_type")
    if given not in (None, SPECS["kv_cache_type"].default, wanted):
        raise UserError(f"--paged-kv-cache {legacy} contradicts --kv-cache-type {given}; give "
                        "only --kv-cache-type (--paged-kv-cache is its deprecated spelling)")
    src["kv_cache_type"] = wanted


class _DeprecatedPagedKvCache(argparse.Action):
    """``--paged-kv-cache enable|disable``: still accepted, with a note, as trtllm-build 1.2 does."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"build_engine: note: --paged-kv-cache is deprecated (as in trtllm-build 1.2); use "
              f"--kv-cache-type {_LEGACY_PAGED[values]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_engine_arguments(parser: argparse.ArgumentParser):
    """Add the engine options to ``parser`` as one argument group and return the group.

    Flags are trtllm-build's names with dashes (``--max-batch-size``, ``--gemm-plugin``,
    ``--kv-cache-type paged|continuous|disabled``, ...); ``dest`` is trtllm-build's underscore
    name. The number of ranks in parallel is ``--build-workers`` because ``--workers`` belongs
    to the converter. Tensor/pipeline parallel sizes come from the checkpoint's config.json.
    """
    g = parser.add_argument_group(
        "engines", "TensorRT-LLM engine build (trtllm-build's options and 1.2 defaults; "
                   "needs tensorrt_llm>=1.0,<1.3 and an NVIDIA GPU)")
    for spec in OPTION_SPECS:
        default_txt = "not set" if spec.default is None else spec.default
        kwargs = dict(dest=spec.name, default=spec.default, type=spec.kind,
                      help=f"{spec.help} (default: {default_txt})")
        if spec.choices:
            kwargs["choices"] = spec.choices
            kwargs["metavar"] = "{" + ",".join(spec.choices) + "}"
        g.add_argument(spec.flag, **kwargs)
    g.add_argument("--paged-kv-cache", dest="paged_kv_cache", default=None, choices=_ONOFF,
                   action=_DeprecatedPagedKvCache, metavar="{enable,disable}",
                   help="deprecated spelling of --kv-cache-type paged|continuous (as in "
                        "trtllm-build 1.2)")
    return g


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions.from_any(args)


def parse_ranks(text: str | None, world: int) -> list[int]:
    """``--ranks A-B`` (or ``R``) → the sorted ranks, checked against the world size."""
    if text is None:
        return list(range(world))
    head, sep, tail = str(text).strip().partition("-")
    try:
        lo = int(head)
        hi = int(tail) if sep else lo
    except ValueError:
        raise UserError(f"--ranks must be A-B or R with whole numbers (got {text!r}), e.g. "
                        f"--ranks 0-{max(0, world // 2 - 1)}") from None
    if lo < 0 or hi < lo or hi >= world:
        raise UserError(f"--ranks {text} is not a range inside the world of {world} rank(s) "
                        f"(0-{world - 1})")
    return list(range(lo, hi + 1))


def deduced_max_seq_len(checkpoint_config: dict) -> int:
    """max_seq_len as TensorRT-LLM deduces it when --max-seq-len is not given (see above)."""
    n = checkpoint_config.get("max_position_embeddings") or 2048
    scaling = checkpoint_config.get("rotary_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = 1 if kind in _UNSCALED_ROPE else (scaling.get("factor") or 1.0)
    return int(math.ceil(n * factor)) if factor != 1 else int(n)


def effective_lengths(opts: EngineOptions, checkpoint_config: dict) -> dict:
    """max_seq_len and max_input_len as the engine will have them: max_seq_len deduced when not
    given, max_input_len clipped to it (TensorRT-LLM does both, with a warning)."""
    seq = opts.max_seq_len if opts.max_seq_len is not None else \
        deduced_max_seq_len(checkpoint_config)
    return {"max_seq_len": seq, "max_input_len": min(opts.max_input_len, seq)}


def trtllm_build_args(options: EngineOptions) -> dict:
    """The dict that reaches TensorRT-LLM for each rank: trtllm-build option names → the values
    trtllm-build would pass on (strings for plugin flags and the KV cache type, ints for sizes).
    An unset optional plugin (``gemm_plugin``) is left out so TensorRT-LLM keeps its own default;
    ``max_seq_len`` is always present (``None`` = deduce from the model, as trtllm-build does)."""
    out = {}
    for spec in OPTION_SPECS:
        if spec.target == _LOCAL:
            continue
        value = getattr(options, spec.name)
        if value is None and spec.target == _PLUGIN:
            continue
        out[spec.name] = value
    if options.lora_plugin is not None:  # BuildConfig.lora_config + PluginConfig.lora_plugin
        out.update(lora_plugin=options.lora_plugin, max_lora_rank=options.max_lora_rank,
                   lora_target_modules=list(options.lora_target_modules))
    return out


def engine_command_hint(checkpoint_dir, output_dir, options=None, extra_flags=()) -> str:
    """The command that builds the engines of ``checkpoint_dir`` into ``output_dir/engines``
    with the same engine options (only non-default flags are spelled out), plus ``extra_flags``."""
    opts = EngineOptions.from_any(options)
    parts = ["build_engine", "--from-checkpoint", str(checkpoint_dir), "--output", str(output_dir)]
    parts += opts.cli_flags() + list(extra_flags)
    return " ".join(shlex.quote(p) for p in parts)
