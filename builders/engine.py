"""Engine stage: ``DIR/checkpoint`` (TRT-LLM checkpoint) → ``DIR/engines`` (``config.json`` +
``rank{r}.engine`` per rank, and ``logs/rank{r}.log``).

Interface to TensorRT-LLM, and why
----------------------------------
Engines exist only in TensorRT-LLM ≤ 1.2.x (1.3 removed the TensorRT backend). ``trtllm-build``
was not used because it always builds *every* rank of a checkpoint in one process: no rank
subset, ``--workers`` silently capped at the visible GPUs, one interleaved stdout, and one failing
rank ends in "Engine building failed, please check error log." after the other ranks' files were
written. So each rank is built by its own subprocess (:mod:`builders.engine_worker`) making the
calls trtllm-build makes for that rank. This gives a log per rank (``logs/rank{r}.log``), up to
``--build-workers`` ranks at once each pinned to its GPU with ``CUDA_VISIBLE_DEVICES``, a failed
rank known by its exit status and reported with its log tail, and TensorRT-LLM imported only in
workers. Every call into TensorRT-LLM goes through :class:`builders.engine_backend.Backend`; what
crosses it for a rank is a flat dict of trtllm-build option names to values
(:func:`builders.engine_options.trtllm_build_args`).

Ranks and nodes
---------------
``ranks`` (``--ranks A-B``) builds only those ranks, e.g. one node of a multi-node world. Every
run builds its ranks in a private directory, then moves them into ``engines.partial/``, shared by
the runs of one world; the run that lands the last rank renames it to ``engines``. So
``engines/`` only ever appears complete, and two runs with disjoint ranks give the same files as
one full run. ``engines.partial/.fingerprint.json`` (checkpoint config + options) keeps runs with
different inputs from mixing; ``.ranks/rank{r}.json`` records the host and GPU (name, compute
capability) each engine was built on, and a run whose GPU differs from an existing rank's is
refused: engines run only on the GPU type they were built for (NVIDIA/TensorRT-LLM#222).

Results and failures
--------------------
:func:`build_engines` returns an :class:`EngineBuildResult` whose ``status`` is

- ``"built"`` (exit code 0): every rank asked for succeeded; ``complete`` tells whether
  ``engines`` is now in place (replacing an old one only with ``force``) or other ranks are
  still missing from ``engines.partial``;
- ``"not_built"`` (exit code 3, the CLI's EXIT_NO_ENGINE): TensorRT-LLM is missing, outside the
  supported window, does not import, or no GPU is visible; ``message`` is one sentence ending
  with the exact command that finishes the job on a GPU host. Nothing is written;
- ``"failed"`` (exit code 4): a rank's build failed. No new rank is started, running ones are
  stopped, ``message`` names the failed rank(s) and holds the tail of the first failed rank's
  log. This run's engines are deleted, its logs kept in ``DIR/engines.failed-logs/``; ranks that
  other runs put in ``engines.partial`` stay. With ``force`` an older ``engines`` is removed too.

It raises :class:`common.errors.UserError` (exit code 2) for input mistakes: a missing or
incomplete checkpoint, an invalid option value or rank range, an existing ``engines`` without
``force``, ranks of other inputs or of another GPU type in ``engines.partial``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import queue
import shutil
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# the options and the seam are re-exported: callers (cli, tests) import them from here
from builders.engine_backend import (CONTAINER, INSTALL_COMMAND, MAX_VERSION_EXCLUSIVE,  # noqa: F401
                                     MIN_VERSION, REQUIREMENT, Availability, Backend,
                                     TrtllmBackend, check_trtllm, parse_version,
                                     version_in_range, visible_device_ids)
from builders.engine_options import (BUILD_KEYS, KV_CACHE_TYPES, OPTION_SPECS,  # noqa: F401
                                     PLUGIN_KEYS, SPECS, EngineOptions, add_engine_arguments,
                                     deduced_max_seq_len, effective_lengths,
                                     engine_command_hint, options_from_args, parse_ranks,
                                     trtllm_build_args)
from builders.engine_stage import (complete, engines_stage, fingerprint, host_gpu, land,
                                   prepare_stage, promote, read_records)
from common.errors import UserError
from common.ownership import remove_owned
from common.staged import StagedOutput

BUILT, NOT_BUILT, FAILED = "built", "not_built", "failed"
EXIT_BUILT, EXIT_NOT_BUILT, EXIT_BUILD_FAILED = 0, 3, 4
LOG_TAIL_LINES = 25


@dataclass
class RankBuild:
    rank: int
    status: str                 # "built" | "failed" | "cancelled" (stopped) | "skipped"
    returncode: int | None = None
    seconds: float = 0.0
    device: str | None = None
    gpu: dict | None = None     # {"name", "compute_capability"} of the GPU it was built on
    log: Path | None = None
    error: str | None = None


@dataclass
class EngineBuildResult:
    status: str                 # BUILT | NOT_BUILT | FAILED
    message: str
    command_hint: str
    engines_dir: Path | None = None     # set when built and complete
    logs_dir: Path | None = None        # engines/logs when built, engines.failed-logs on failure
    trtllm_version: str | None = None
    ranks: list[RankBuild] = field(default_factory=list)   # the ranks this run was asked for
    seconds: float = 0.0
    log_tail: str | None = None
    complete: bool = False      # every rank of the world is in engines/
    world_size: int = 0
    built_on: dict = field(default_factory=dict)  # rank → its .ranks record, all runs so far
    lengths: dict = field(default_factory=dict)   # max_seq_len / max_input_len the engine gets

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
        d["built_on"] = {str(k): v for k, v in sorted(self.built_on.items())}
        return d


# --- inputs ----------------------------------------------------------------------------------

def read_checkpoint_layout(checkpoint_dir: Path, ranks=None) -> tuple[dict, int]:
    """The checkpoint's config.json and world size, after checking that the rank files of
    ``ranks`` (default: all) are there."""
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
        raise UserError(f"{cfg_path} is not a TensorRT-LLM checkpoint config ({e}); give the "
                        f"checkpoint/ directory build_engine wrote, or convert again") from None
    if world != tp * pp or world < 1:
        raise UserError(f"{cfg_path}: mapping world_size {world} != tp_size {tp} x pp_size {pp}")
    if not config.get("architecture"):
        raise UserError(f"{cfg_path} has no 'architecture'")
    wanted = range(world) if ranks is None else ranks
    missing = [f"rank{r}.safetensors" for r in wanted
               if not (checkpoint_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise UserError(f"checkpoint {checkpoint_dir} is incomplete: {', '.join(missing)} missing "
                        f"for world_size {world}; rebuild it with build_engine --force")
    return config, world


def check_options_against_checkpoint(opts: EngineOptions, config: dict) -> None:
    """Refuse engine options the checkpoint's format cannot take (``config``: its config.json,
    or what the plan knows of it)."""
    quant = (config.get("quantization") or {}).get("quant_algo")
    for name, needs in (("gemm_plugin", {"fp8": "FP8", "nvfp4": "NVFP4"}),
                        ("gemm_swiglu_plugin", {"fp8": "FP8"}),
                        ("low_latency_gemm_plugin", {"fp8": "FP8"})):
        value = getattr(opts, name)
        if value in needs and quant != needs[value]:
            raise UserError(f"{SPECS[name].flag} {value} needs a checkpoint quantized as "
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


# --- running the ranks -----------------------------------------------------------------------

def _run_ranks(backend: Backend, checkpoint_dir: Path, work: Path, args: dict, todo: list[int],
               device_ids: list[str], gpu: dict | None, progress) -> list[RankBuild]:
    """Build ``todo`` into ``work`` (``work/logs`` for the logs), at most one rank per device at
    a time; stop starting (and stop running) ranks after the first failure."""
    devices: queue.Queue = queue.Queue()
    for d in device_ids:
        devices.put(d)
    cancel, first_failure = threading.Event(), threading.Lock()
    builds = {r: RankBuild(r, "skipped", log=work / "logs" / f"rank{r}.log") for r in todo}

    def one(rank: int) -> None:
        rb = builds[rank]
        if cancel.is_set():
            return
        device = devices.get()
        start = time.perf_counter()
        rb.device, rb.gpu = device, gpu
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

    with cf.ThreadPoolExecutor(max_workers=len(device_ids), thread_name_prefix="engine") as pool:
        futures = [pool.submit(one, r) for r in todo]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            cancel.set()  # before the pool's exit waits: running builds are stopped
            raise
    return [builds[r] for r in todo]


# --- the stage ---------------------------------------------------------------------------------

@dataclass
class _Run:
    """What one call of :func:`build_engines` settled before building: its ranks of the world,
    the stage it shares, the finish-on-a-GPU-host command, the TensorRT-LLM found."""
    staged: StagedOutput
    todo: list[int]
    world: int
    force: bool
    hint: str
    avail: Availability
    lengths: dict
    t0: float
    device_ids: list[str] = field(default_factory=list)

    @property
    def subset(self) -> bool:
        return len(self.todo) < self.world

    @property
    def failed_logs(self) -> Path:
        dest = self.staged.dest
        return dest.with_name(dest.name + ".failed-logs")


def build_engines(checkpoint_dir, engines_dir, options=None, *, backend: Backend | None = None,
                  force: bool = False, progress=None, hint_flags=(), ranks=None
                  ) -> EngineBuildResult:
    """Compile one engine per rank of ``checkpoint_dir`` (or per rank of ``ranks``, a list or an
    ``"A-B"`` string) into ``engines_dir``.

    ``options``: EngineOptions, a mapping or an argparse Namespace (see :func:`options_from_args`).
    ``hint_flags``: extra flags for the finish-on-a-GPU-host command (e.g. the caller's Triton
    choices). ``progress``: optional callable(str) told when each rank starts and ends.
    Returns an :class:`EngineBuildResult` (see the module docstring for statuses and exit codes).
    """
    t0 = time.perf_counter()
    checkpoint_dir, engines_dir = Path(checkpoint_dir), Path(engines_dir)
    opts = EngineOptions.from_any(options)
    config, world = read_checkpoint_layout(checkpoint_dir, ranks=[])
    todo = parse_ranks(ranks, world) if ranks is None or isinstance(ranks, str) else \
        parse_ranks(f"{min(ranks)}-{max(ranks)}", world)
    read_checkpoint_layout(checkpoint_dir, ranks=todo)
    check_options_against_checkpoint(opts, config)
    lengths = effective_lengths(opts, config)
    if len(todo) < world:
        hint_flags = tuple(hint_flags) + ("--ranks", f"{todo[0]}-{todo[-1]}")
    hint = engine_command_hint(checkpoint_dir, engines_dir.parent, opts, hint_flags)
    backend = backend if backend is not None else TrtllmBackend()
    run = _Run(engines_stage(engines_dir), todo, world, force, hint, check_trtllm(backend),
               lengths, t0)
    if not run.avail.ok:
        reason = " ".join(run.avail.reason.split())  # one line, whatever an import error printed
        msg = f"Engines were not built because {reason}; to build them on a GPU host run: {hint}"
        return EngineBuildResult(NOT_BUILT, msg, hint, trtllm_version=run.avail.version,
                                 seconds=time.perf_counter() - t0, world_size=world,
                                 lengths=run.lengths)
    if engines_dir.exists() and not force:
        raise UserError(f"{engines_dir} already exists; pass --force to replace it")
    run.device_ids = visible_device_ids(max(1, min(opts.build_workers, len(todo),
                                                   run.avail.gpus))) or ["0"]
    gpu = host_gpu(backend, run.device_ids)
    args = trtllm_build_args(opts)
    prepare_stage(run.staged, fingerprint(checkpoint_dir, args), gpu, run.subset, force)
    if force and run.subset:
        remove_owned(engines_dir)  # a full run replaces it only once complete (swap_into_place)
    # this run's private directory: TensorRT-LLM writes here, finished ranks are then moved
    work = run.staged.stage / f".run-{todo[0]}-{todo[-1]}-{os.getpid()}"
    _rmtree(work)
    (work / "logs").mkdir(parents=True)
    try:
        builds = _run_ranks(backend, checkpoint_dir, work, args, todo, run.device_ids, gpu,
                            progress)
    except BaseException:
        run.staged.discard([work.name])
        raise
    if any(rb.status != "built" for rb in builds):
        return _failed(run, builds, work)
    return _landed(run, builds, work)


def _landed(run: _Run, builds: list[RankBuild], work: Path) -> EngineBuildResult:
    """Move the built ranks into the stage; promote it when it holds every rank."""
    stage, engines_dir, todo, world = run.staged.stage, run.staged.dest, run.todo, run.world
    try:
        land(work, stage, builds, run.avail.version)
        run.staged.discard([work.name])
        records = read_records(stage)
        done = complete(stage, world) and promote(run.staged, world)
    except BaseException:  # e.g. a full disk: this run's ranks go (other runs' stay, --ranks)
        run.staged.discard([work.name, *(f for r in todo for f in (
            f"rank{r}.engine", f".ranks/rank{r}.json", f"logs/rank{r}.log"))]
            if run.subset else None)
        raise
    if done:
        for rb in builds:
            rb.log = engines_dir / "logs" / rb.log.name
    _rmtree(run.failed_logs)
    seconds = time.perf_counter() - run.t0
    which = f"rank(s) {todo[0]}-{todo[-1]} of {world}" if run.subset else f"{world} rank(s)"
    if done:
        msg = (f"{engines_dir} ({which}, TensorRT-LLM {run.avail.version}, "
               f"{len(run.device_ids)} in parallel) in {seconds:.1f}s")
    else:
        missing = [r for r in range(world) if r not in records]
        msg = (f"{which} built into {stage} in {seconds:.1f}s; {engines_dir} appears "
               f"when the other ranks are built there too (missing: {_ranges(missing)})")
    return EngineBuildResult(BUILT, msg, run.hint, engines_dir=engines_dir if done else None,
                             logs_dir=(engines_dir if done else stage) / "logs",
                             trtllm_version=run.avail.version, ranks=builds, seconds=seconds,
                             complete=done, world_size=world, built_on=records,
                             lengths=run.lengths)


def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _failed(run: _Run, builds: list[RankBuild], work: Path) -> EngineBuildResult:
    """This run's engines go, its logs are kept in ``engines.failed-logs``; the ranks other runs
    put in the stage stay."""
    failed_logs, engines_dir = run.failed_logs, run.staged.dest
    _rmtree(failed_logs)
    os.replace(work / "logs", failed_logs)
    run.staged.discard([work.name] if run.subset else None)
    if run.force:
        remove_owned(engines_dir)
    for rb in builds:
        rb.log = failed_logs / rb.log.name
    failed = [rb for rb in builds if rb.status == "failed"]
    first = failed[0] if failed else next(rb for rb in builds if rb.status != "built")
    tail = _tail(first.log)
    how = first.error or f"exit status {first.returncode}"
    others = [rb.rank for rb in failed[1:]]
    msg = (f"Engine build failed for rank {first.rank} ({how}); no {engines_dir} was written; "
           f"logs are in {failed_logs}"
           + (f"; ranks {others} failed too" if others else "")
           + f". Last lines of {first.log}:\n{tail}")
    return EngineBuildResult(FAILED, msg, run.hint, logs_dir=failed_logs,
                             trtllm_version=run.avail.version, ranks=builds,
                             seconds=time.perf_counter() - run.t0, log_tail=tail,
                             world_size=run.world)
