"""Engine stage: ``DIR/checkpoint`` (TRT-LLM checkpoint) → ``DIR/engines`` (``config.json`` +
``rank{r}.engine`` per rank, and ``logs/rank{r}.log``).

Interface to TensorRT-LLM, and why
----------------------------------
Engines exist only in TensorRT-LLM 0.12 … 1.2.x (1.3 removed the TensorRT backend). Two
documented entry points build them: the ``trtllm-build`` command and the Python functions it is
made of (``tensorrt_llm.commands.build.build_model`` → ``tensorrt_llm.builder.build`` →
``Engine.save``). ``trtllm-build`` was not chosen because it always builds *every* rank of a
checkpoint in one process: it has no single-rank option, its ``--workers`` is silently capped at
``torch.cuda.device_count()``, all ranks write to one interleaved stdout, and one failing rank
ends in the generic "Engine building failed, please check error log." after the other ranks'
files have already been written into the output directory.

So each rank is built by its own subprocess, ``python -m builders.engine --rank R ...`` (the
worker at the bottom of this module), which calls TensorRT-LLM's Python API for that one rank in
the same way ``trtllm-build`` does for each of its ranks: ``PluginConfig.from_arguments`` with the
plugin flags under their trtllm-build names and values ("enable"/"disable", "auto"/dtype),
``BuildConfig.from_dict`` with the size limits, ``PretrainedConfig.from_json_file`` and
``build_model(build_config, rank, checkpoint_dir, model_config)``, then ``engine.save``. Those
names and signatures are the same from 0.12 to 1.2. This gives:

- a log per rank, ``logs/rank{r}.log`` (the subprocess's stdout and stderr);
- up to ``--build-workers`` ranks at once, each pinned to its own GPU with
  ``CUDA_VISIBLE_DEVICES`` (concurrency is capped at the number of visible GPUs, as
  trtllm-build caps its workers);
- a failing rank known by its exit status, reported with the tail of its own log;
- a process boundary: TensorRT-LLM is imported only in workers, never in this process.

All calls into TensorRT-LLM go through one seam, the :class:`Backend` protocol
(``version``, ``import_error``, ``gpu_count``, ``build_rank``); :class:`TrtllmBackend` is the
real one. What crosses the seam for a rank is a flat dict of trtllm-build option names to the
values trtllm-build would receive (see :func:`trtllm_build_args`).

Results and failures
--------------------
:func:`build_engines` returns an :class:`EngineBuildResult` whose ``status`` is

- ``"built"`` (exit code 0): every rank succeeded; the work directory ``engines.partial`` was
  renamed to ``engines`` (replacing an old one only with ``force``);
- ``"not_built"`` (exit code 3, the CLI's EXIT_NO_ENGINE): TensorRT-LLM is missing, outside
  [0.12, 1.3), does not import, or no GPU is visible; ``message`` is one sentence that ends with
  the exact command finishing the job on a GPU host (:func:`engine_command_hint`). Nothing is
  written;
- ``"failed"`` (exit code 4): a rank's build failed. No new rank is started, running ones are
  stopped, ``message`` names the failed rank(s) and holds the tail of the first failed rank's log.
  The partial engines are deleted (a rank's engine is useless without the others and can be many
  GB), the logs are kept in ``DIR/engines.failed-logs/``, and no ``DIR/engines`` is left behind
  (with ``force`` an older one is removed too: it was built from a checkpoint that is being
  replaced, and must not pass for the result of this run).

It raises :class:`convert.errors.UserError` (exit code 2) only for input mistakes: a missing or
incomplete checkpoint, an invalid option value, an existing ``engines`` without ``force``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.metadata
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

from convert.atomic import swap_into_place
from convert.errors import UserError

# --- version window and the words used when it is not met -----------------------------------

MIN_VERSION = (0, 12)          # first release whose checkpoint format and build_model we target
MAX_VERSION_EXCLUSIVE = (1, 3)  # 1.3 removed the TensorRT engine backend
REQUIREMENT = "tensorrt_llm>=0.12,<1.3"
INSTALL_COMMAND = 'pip install "tensorrt_llm<1.3" --extra-index-url https://pypi.nvidia.com'
CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"

BUILT, NOT_BUILT, FAILED = "built", "not_built", "failed"
EXIT_BUILT, EXIT_NOT_BUILT, EXIT_BUILD_FAILED = 0, 3, 4
LOG_TAIL_LINES = 25
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# --- options -----------------------------------------------------------------------------------

_PLUGIN_DTYPES = ("auto", "float16", "bfloat16", "float32", "disable")
_GEMM_CHOICES = ("auto", "float16", "bfloat16", "float32", "int32", "fp8", "nvfp4", "disable")
_ONOFF = ("enable", "disable")
_LOG_LEVELS = ("internal_error", "error", "warning", "info", "verbose", "debug", "trace")

# Where each option goes in TensorRT-LLM: BuildConfig ("build"), PluginConfig ("plugin"), the
# TRT-LLM logger ("logger"), or nowhere, used by this stage only ("local").
_BUILD, _PLUGIN, _LOGGER, _LOCAL = "build", "plugin", "logger", "local"


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


# Defaults are those of trtllm-build in TensorRT-LLM 1.2 (BuildConfig / PluginConfig fields).
# They are always passed explicitly, so the same flags give the same engine on 0.12 … 1.2, whose
# own defaults differ (e.g. max_batch_size 256 and use_fp8_context_fmha off in early releases).
OPTION_SPECS: tuple[_Spec, ...] = (
    _Spec("max_batch_size", int, 2048, _BUILD,
          "maximum number of requests the engine can schedule at once"),
    _Spec("max_input_len", int, 1024, _BUILD, "maximum prompt length of one request"),
    _Spec("max_seq_len", int, None, _BUILD,
          "maximum total length (prompt + output) of one request (default: the model's "
          "max_position_embeddings, scaled by its rope factor)", optional=True),
    _Spec("max_num_tokens", int, 8192, _BUILD,
          "maximum number of batched input tokens per step after padding removal"),
    _Spec("max_beam_width", int, 1, _BUILD, "maximum beam width for beam search"),
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
    _Spec("paged_kv_cache", str, "enable", _PLUGIN, "paged KV cache (needed by Triton's "
          "in-flight batching)", _ONOFF),
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
_SPECS = {s.name: s for s in OPTION_SPECS}
PLUGIN_KEYS = tuple(s.name for s in OPTION_SPECS if s.target == _PLUGIN)
BUILD_KEYS = tuple(s.name for s in OPTION_SPECS if s.target == _BUILD)


@dataclass(frozen=True)
class EngineOptions:
    """Every engine option, named as trtllm-build names it (``--build-workers`` excepted)."""

    max_batch_size: int = 2048
    max_input_len: int = 1024
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    max_beam_width: int = 1
    gpt_attention_plugin: str = "auto"
    gemm_plugin: str | None = None
    gemm_swiglu_plugin: str = "disable"
    low_latency_gemm_plugin: str = "disable"
    paged_kv_cache: str = "enable"
    remove_input_padding: str = "enable"
    context_fmha: str = "enable"
    use_paged_context_fmha: str = "enable"
    use_fp8_context_fmha: str = "enable"
    use_fused_mlp: str = "enable"
    multiple_profiles: str = "disable"
    log_level: str = "info"
    build_workers: int = 1

    @classmethod
    def from_any(cls, options) -> "EngineOptions":
        """From an EngineOptions, a mapping or an argparse Namespace (unknown names ignored)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            opts = options
        else:
            src = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
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
        if self.gemm_swiglu_plugin == "fp8" and self.use_fused_mlp != "enable":
            raise UserError("--gemm-swiglu-plugin fp8 needs --use-fused-mlp enable "
                            "(TensorRT-LLM refuses the GEMM+SwiGLU plugin without the fused MLP)")

    def as_dict(self) -> dict:
        return asdict(self)

    def cli_flags(self, only_changed: bool = True) -> list[str]:
        """``--flag value`` pairs for build_engine (by default only those that differ from the
        defaults, which is enough to reproduce these options)."""
        out = []
        for spec in OPTION_SPECS:
            value = getattr(self, spec.name)
            if value is None or (only_changed and value == spec.default):
                continue
            out += [spec.flag, str(value)]
        return out


def add_engine_arguments(parser: argparse.ArgumentParser):
    """Add the engine options to ``parser`` as one argument group and return the group.

    Flags are trtllm-build's names with dashes (``--max-batch-size``, ``--gemm-plugin``,
    ``--paged-kv-cache enable|disable``, ...); ``dest`` is trtllm-build's underscore name. The
    number of ranks in parallel is ``--build-workers`` because ``--workers`` belongs to the
    converter. Tensor/pipeline parallel sizes come from the checkpoint's config.json.
    """
    g = parser.add_argument_group(
        "engines", "TensorRT-LLM engine build (trtllm-build's options and 1.2 defaults; "
                   "needs tensorrt_llm>=0.12,<1.3 and an NVIDIA GPU)")
    for spec in OPTION_SPECS:
        default_txt = "not set" if spec.default is None else spec.default
        kwargs = dict(dest=spec.name, default=spec.default, type=spec.kind,
                      help=f"{spec.help} (default: {default_txt})")
        if spec.choices:
            kwargs["choices"] = spec.choices
            kwargs["metavar"] = "{" + ",".join(spec.choices) + "}"
        g.add_argument(spec.flag, **kwargs)
    return g


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions.from_any(args)


def trtllm_build_args(options: EngineOptions) -> dict:
    """The dict that reaches TensorRT-LLM for each rank: trtllm-build option names → the values
    trtllm-build would pass on (strings for plugin flags, ints for sizes). An unset optional
    plugin (``gemm_plugin``) is left out so TensorRT-LLM keeps its own default; ``max_seq_len``
    is always present (``None`` = deduce from the model, as trtllm-build does)."""
    out = {}
    for spec in OPTION_SPECS:
        if spec.target == _LOCAL:
            continue
        value = getattr(options, spec.name)
        if value is None and spec.target == _PLUGIN:
            continue
        out[spec.name] = value
    return out


def engine_command_hint(checkpoint_dir, output_dir, options=None, extra_flags=()) -> str:
    """The command that builds the engines of ``checkpoint_dir`` into ``output_dir/engines``
    with the same engine options (only non-default flags are spelled out), plus ``extra_flags``."""
    opts = EngineOptions.from_any(options)
    parts = ["build_engine", "--from-checkpoint", str(checkpoint_dir), "--output", str(output_dir)]
    parts += opts.cli_flags() + list(extra_flags)
    return " ".join(shlex.quote(p) for p in parts)


# --- the seam ----------------------------------------------------------------------------------

@runtime_checkable
class Backend(Protocol):
    """Everything this stage asks of TensorRT-LLM."""

    def version(self) -> str | None:
        """The installed TensorRT-LLM version, or None when it is not installed."""

    def import_error(self) -> str | None:
        """None when ``import tensorrt_llm`` works, else the error, one line."""

    def gpu_count(self) -> int:
        """Number of NVIDIA GPUs visible to a build."""

    def build_rank(self, rank: int, checkpoint_dir: Path, out_dir: Path, trtllm_args: dict,
                   log_path: Path, *, device: str | None = None,
                   cancel: threading.Event | None = None) -> int:
        """Build ``out_dir/rank{rank}.engine`` (and ``out_dir/config.json`` for rank 0) on GPU
        ``device`` (a CUDA_VISIBLE_DEVICES entry), writing all output to ``log_path``; return
        the exit status (0 = success). Stop early when ``cancel`` is set."""


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _visible_device_ids(n: int) -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        ids = [x.strip() for x in env.split(",") if x.strip()]
        return ids[:n]
    return [str(i) for i in range(n)]


class TrtllmBackend:
    """The real TensorRT-LLM, used through ``python -m builders.engine`` worker subprocesses.

    Nothing here imports tensorrt_llm: the version comes from the installed distribution's
    metadata, importability from a subprocess probe, the GPU count from torch or nvidia-smi.
    """

    PROBE_TIMEOUT_S = 600

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self._probe: dict | None = None

    # availability
    def _run_probe(self) -> dict:
        if self._probe is None:
            code = ("import json, tensorrt_llm; "
                    "print('TRTLLM_PROBE ' + json.dumps({'version': tensorrt_llm.__version__}))")
            try:
                p = subprocess.run([self.python, "-c", code], capture_output=True, text=True,
                                   timeout=self.PROBE_TIMEOUT_S, env=self._env(None))
            except subprocess.TimeoutExpired:
                self._probe = {"error": f"import tensorrt_llm took over {self.PROBE_TIMEOUT_S}s"}
                return self._probe
            line = next((x for x in p.stdout.splitlines() if x.startswith("TRTLLM_PROBE ")), None)
            if p.returncode == 0 and line:
                self._probe = json.loads(line.split(" ", 1)[1])
            else:
                err = [x for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
                self._probe = {"error": err[-1].strip() if err else f"exit status {p.returncode}"}
        return self._probe

    def version(self) -> str | None:
        v = _dist_version("tensorrt_llm", "tensorrt-llm")
        if v is not None:
            return v
        try:
            spec = importlib.util.find_spec("tensorrt_llm")
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        return self._run_probe().get("version", "unknown")  # a source tree on the path

    def import_error(self) -> str | None:
        return self._run_probe().get("error")

    def gpu_count(self) -> int:
        try:
            import torch

            n = torch.cuda.device_count()
            if n:
                return n
        except Exception:  # noqa: BLE001 - a broken torch just means: ask nvidia-smi
            pass
        smi = shutil.which("nvidia-smi")
        if not smi:
            return 0
        try:
            p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return 0
        n = sum(1 for line in p.stdout.splitlines() if line.startswith("GPU "))
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            n = min(n, len([x for x in env.split(",") if x.strip() and x.strip() != "-1"]))
        return n

    # building
    def _env(self, device: str | None) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        return env

    def worker_command(self, rank: int, checkpoint_dir: Path, out_dir: Path,
                       trtllm_args: dict) -> list[str]:
        return [self.python, "-m", "builders.engine", "--rank", str(rank),
                "--checkpoint-dir", str(Path(checkpoint_dir).resolve()),
                "--output-dir", str(Path(out_dir).resolve()),
                "--trtllm-args", json.dumps(trtllm_args, sort_keys=True)]

    def build_rank(self, rank, checkpoint_dir, out_dir, trtllm_args, log_path, *, device=None,
                   cancel=None) -> int:
        cmd = self.worker_command(rank, checkpoint_dir, out_dir, trtllm_args)
        log_path = Path(log_path)
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"# rank {rank} on CUDA_VISIBLE_DEVICES={device}\n# {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self._env(device),
                                    cwd=str(log_path.parent))
            try:
                while True:
                    try:
                        return proc.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        if cancel is not None and cancel.is_set():
                            _stop(proc)
                            return proc.returncode
            except BaseException:
                _stop(proc)
                raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- availability ------------------------------------------------------------------------------

def parse_version(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"\s*v?(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_in_range(text: str | None) -> bool:
    v = parse_version(text)
    return v is not None and MIN_VERSION <= v < MAX_VERSION_EXCLUSIVE


@dataclass
class Availability:
    ok: bool
    version: str | None
    gpus: int
    reason: str | None  # a clause: "because ..." (None when ok)


def check_trtllm(backend: Backend) -> Availability:
    """Installed? In [0.12, 1.3)? A GPU visible? Importable? — in that order, cheapest first."""
    version = backend.version()
    if version is None:
        return Availability(False, None, 0, "TensorRT-LLM is not installed here (install it with "
                            f"{INSTALL_COMMAND}, or use the {CONTAINER} container)")
    parsed = parse_version(version)
    if parsed is not None and not version_in_range(version):
        why = ("1.3 removed the TensorRT engine backend" if parsed >= MAX_VERSION_EXCLUSIVE
               else "releases before 0.12 do not read this checkpoint format")
        return Availability(False, version, 0, f"TensorRT-LLM {version} is installed but engines "
                            f"need {REQUIREMENT} ({why}): install one with {INSTALL_COMMAND} or "
                            f"use the {CONTAINER} container")
    gpus = backend.gpu_count()
    if gpus < 1:
        return Availability(False, version, 0, "no NVIDIA GPU is visible here (torch.cuda and "
                            "nvidia-smi found none) and TensorRT engines are compiled on the GPU "
                            "they will run on")
    err = backend.import_error()
    if err:
        return Availability(False, version, gpus, f"import tensorrt_llm {version} fails ({err})")
    if parsed is None:
        return Availability(False, version, gpus, f"the installed TensorRT-LLM reports version "
                            f"{version!r}, which is not a release in {REQUIREMENT}")
    return Availability(True, version, gpus, None)


# --- results -----------------------------------------------------------------------------------

@dataclass
class RankBuild:
    rank: int
    status: str                 # "built" | "failed" | "cancelled" (stopped) | "skipped"
    returncode: int | None = None
    seconds: float = 0.0
    device: str | None = None
    log: Path | None = None
    error: str | None = None


@dataclass
class EngineBuildResult:
    status: str                 # BUILT | NOT_BUILT | FAILED
    message: str
    command_hint: str
    engines_dir: Path | None = None     # set when built
    logs_dir: Path | None = None        # engines/logs when built, engines.failed-logs on failure
    trtllm_version: str | None = None
    ranks: list[RankBuild] = field(default_factory=list)
    seconds: float = 0.0
    log_tail: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == BUILT

    @property
    def exit_code(self) -> int:
        return {BUILT: EXIT_BUILT, NOT_BUILT: EXIT_NOT_BUILT}.get(self.status, EXIT_BUILD_FAILED)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("engines_dir", "logs_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        for r in d["ranks"]:
            r["log"] = str(r["log"]) if r["log"] is not None else None
        return d


# --- the stage ---------------------------------------------------------------------------------

def read_checkpoint_layout(checkpoint_dir: Path) -> tuple[dict, int]:
    """The checkpoint's config.json and world size, after checking every rank file is there."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg_path = checkpoint_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} not found: --from-checkpoint needs a TensorRT-LLM checkpoint "
                        "directory (config.json + rank{r}.safetensors) as written by build_engine")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        mapping = config.get("mapping") or {}
        tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
        world = int(mapping.get("world_size", tp * pp))
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{cfg_path} is not a TensorRT-LLM checkpoint config ({e})") from None
    if world != tp * pp or world < 1:
        raise UserError(f"{cfg_path}: mapping world_size {world} != tp_size {tp} x pp_size {pp}")
    if not config.get("architecture"):
        raise UserError(f"{cfg_path} has no 'architecture'")
    missing = [f"rank{r}.safetensors" for r in range(world)
               if not (checkpoint_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise UserError(f"checkpoint {checkpoint_dir} is incomplete: {', '.join(missing)} missing "
                        f"for world_size {world}; rebuild it with build_engine --force")
    return config, world


def _check_options_against_checkpoint(opts: EngineOptions, config: dict) -> None:
    quant = (config.get("quantization") or {}).get("quant_algo")
    for name, needs in (("gemm_plugin", {"fp8": "FP8", "nvfp4": "NVFP4"}),
                        ("gemm_swiglu_plugin", {"fp8": "FP8"}),
                        ("low_latency_gemm_plugin", {"fp8": "FP8"})):
        value = getattr(opts, name)
        if value in needs and quant != needs[value]:
            raise UserError(f"{_SPECS[name].flag} {value} needs a checkpoint quantized as "
                            f"{needs[value]} (its scaling factors), but this checkpoint's "
                            f"quant_algo is {quant}")


def _tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not Path(path).is_file():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def build_engines(checkpoint_dir, engines_dir, options=None, *, backend: Backend | None = None,
                  force: bool = False, progress=None, hint_flags=()) -> EngineBuildResult:
    """Compile one engine per rank of ``checkpoint_dir`` into ``engines_dir``.

    ``options``: EngineOptions, a mapping or an argparse Namespace (see :func:`options_from_args`).
    ``hint_flags``: extra flags for the finish-on-a-GPU-host command (e.g. the caller's Triton
    choices).
    ``progress``: optional callable(str) told when each rank starts and ends.
    Returns an :class:`EngineBuildResult` (see the module docstring for statuses and exit codes).
    """
    t0 = time.perf_counter()
    checkpoint_dir, engines_dir = Path(checkpoint_dir), Path(engines_dir)
    opts = EngineOptions.from_any(options)
    config, world = read_checkpoint_layout(checkpoint_dir)
    _check_options_against_checkpoint(opts, config)
    hint = engine_command_hint(checkpoint_dir, engines_dir.parent, opts, hint_flags)
    backend = backend if backend is not None else TrtllmBackend()

    avail = check_trtllm(backend)
    if not avail.ok:
        reason = " ".join(avail.reason.split())  # one line, whatever an import error printed
        msg = f"Engines were not built because {reason}; to build them on a GPU host run: {hint}"
        return EngineBuildResult(NOT_BUILT, msg, hint,
                                 trtllm_version=avail.version,
                                 seconds=time.perf_counter() - t0)

    if engines_dir.exists() and not force:
        raise UserError(f"{engines_dir} already exists; pass --force to replace it")
    work = engines_dir.with_name(engines_dir.name + ".partial")
    failed_logs = engines_dir.with_name(engines_dir.name + ".failed-logs")
    _rmtree(work)
    (work / "logs").mkdir(parents=True)

    args = trtllm_build_args(opts)
    device_ids = _visible_device_ids(max(1, min(opts.build_workers, world, avail.gpus))) or ["0"]
    n_parallel = len(device_ids)
    devices: queue.Queue = queue.Queue()
    for d in device_ids:
        devices.put(d)
    cancel, first_failure = threading.Event(), threading.Lock()
    ranks = [RankBuild(r, "skipped", log=work / "logs" / f"rank{r}.log") for r in range(world)]

    def one(rank: int) -> None:
        rb = ranks[rank]
        if cancel.is_set():
            return
        device = devices.get()
        start = time.perf_counter()
        rb.device = device
        try:
            if progress:
                progress(f"rank {rank}: building on GPU {device}")
            try:
                rc = backend.build_rank(rank, checkpoint_dir, work, dict(args), rb.log,
                                        device=device, cancel=cancel)
            except Exception as e:  # noqa: BLE001 - a backend bug is reported like a failed rank
                with open(rb.log, "a", encoding="utf-8") as f:
                    f.write(traceback.format_exc())
                rc, rb.error = -1, f"{type(e).__name__}: {e}"
            rb.returncode = rc
            if rc == 0:
                expected = [work / f"rank{rank}.engine"] + ([work / "config.json"] if rank == 0
                                                            else [])
                missing = [p.name for p in expected if not p.is_file()]
                if missing:
                    rc, rb.error = -1, f"exited 0 but wrote no {', '.join(missing)}"
            with first_failure:
                if rc == 0:
                    rb.status = "built"
                elif cancel.is_set() and rb.error is None:
                    rb.status = "cancelled"  # stopped because another rank failed first
                else:
                    rb.status = "failed"
                    cancel.set()
            if progress:
                progress(f"rank {rank}: {rb.status} in {time.perf_counter() - start:.1f}s")
        finally:
            rb.seconds = time.perf_counter() - start
            devices.put(device)

    try:
        with cf.ThreadPoolExecutor(max_workers=n_parallel, thread_name_prefix="engine") as pool:
            futures = [pool.submit(one, r) for r in range(world)]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                cancel.set()  # before the pool's exit waits: running builds are stopped
                raise
    except BaseException:
        _rmtree(work)
        raise

    failed = [rb for rb in ranks if rb.status == "failed"]
    if failed or any(rb.status != "built" for rb in ranks):
        _rmtree(failed_logs)
        os.replace(work / "logs", failed_logs)
        _rmtree(work)
        if force:
            _rmtree(engines_dir)
        for rb in ranks:
            rb.log = failed_logs / rb.log.name
        first = failed[0] if failed else next(rb for rb in ranks if rb.status != "built")
        tail = _tail(first.log)
        how = first.error or f"exit status {first.returncode}"
        others = [rb.rank for rb in failed[1:]]
        msg = (f"Engine build failed for rank {first.rank} ({how}); no {engines_dir} was written; "
               f"logs are in {failed_logs}"
               + (f"; ranks {others} failed too" if others else "")
               + f". Last lines of {first.log}:\n{tail}")
        return EngineBuildResult(FAILED, msg, hint, logs_dir=failed_logs,
                                 trtllm_version=avail.version, ranks=ranks,
                                 seconds=time.perf_counter() - t0, log_tail=tail)

    swap_into_place(work, engines_dir)  # an old one (force) goes only now that the new is complete
    _rmtree(failed_logs)
    for rb in ranks:
        rb.log = engines_dir / "logs" / rb.log.name
    seconds = time.perf_counter() - t0
    msg = (f"engines: {engines_dir} ({world} rank(s), TensorRT-LLM {avail.version}, "
           f"{n_parallel} in parallel) in {seconds:.1f}s")
    return EngineBuildResult(BUILT, msg, hint, engines_dir=engines_dir,
                             logs_dir=engines_dir / "logs", trtllm_version=avail.version,
                             ranks=ranks, seconds=seconds)


# --- the worker: one rank, inside a subprocess, with TensorRT-LLM imported ----------------------

def _build_one_rank(rank: int, checkpoint_dir: str, output_dir: str, trtllm_args: dict) -> None:
    from tensorrt_llm.builder import BuildConfig
    from tensorrt_llm.commands.build import build_model
    from tensorrt_llm.logger import logger
    from tensorrt_llm.models import PretrainedConfig
    from tensorrt_llm.plugin import PluginConfig

    args = dict(trtllm_args)
    logger.set_level(args.pop("log_level", "info"))
    import tensorrt_llm

    print(f"[builders.engine] rank {rank}: TensorRT-LLM {tensorrt_llm.__version__}, "
          f"args {json.dumps(args, sort_keys=True)}", flush=True)

    # Plugin flags keep trtllm-build's string values: PluginConfig turns "enable"/"disable"
    # into booleans / None itself, and ignores names an older release does not have.
    plugin_config = PluginConfig.from_arguments(
        argparse.Namespace(**{k: args[k] for k in PLUGIN_KEYS if k in args}))
    if hasattr(plugin_config, "validate"):
        plugin_config.validate()
    build_dict = {k: args.get(k) for k in BUILD_KEYS}
    build_dict.update({
        "opt_num_tokens": None,          # from_dict needs the key; None = trtllm-build default
        "strongly_typed": True,          # what trtllm-build always passes
        "output_timing_cache": None,     # trtllm-build would drop model.cache into the cwd
        "input_timing_cache": None,
    })
    build_config = BuildConfig.from_dict(build_dict, plugin_config=plugin_config)
    model_config = PretrainedConfig.from_json_file(os.path.join(checkpoint_dir, "config.json"))

    # Releases before 1.0 read the fused-MLP switch from build_model's kwargs, and trtllm-build
    # turns it off there for quantized checkpoints other than FP8 / mixed precision.
    quant = getattr(getattr(model_config, "quantization", None), "quant_algo", None)
    use_fused_mlp = args.get("use_fused_mlp") == "enable" and (
        not quant or quant in ("FP8", "MIXED_PRECISION"))
    engine = build_model(build_config, rank, checkpoint_dir, model_config,
                         use_fused_mlp=use_fused_mlp)
    if engine is None:
        raise RuntimeError("build_model returned no engine")
    engine.save(output_dir)
    print(f"[builders.engine] rank {rank}: saved to {output_dir}", flush=True)


def _worker_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m builders.engine",
                                description="Build one rank's TensorRT engine (internal worker "
                                            "of build_engine; one process per rank).")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--trtllm-args", required=True, help="JSON: trtllm-build option → value")
    a = p.parse_args(argv)
    try:
        _build_one_rank(a.rank, a.checkpoint_dir, a.output_dir, json.loads(a.trtllm_args))
    except BaseException:  # noqa: BLE001 - the traceback goes to the rank log, the status out
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
