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
import hashlib
import json
import os
import queue
import re
import shutil
import socket
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
from common.atomic import swap_into_place
from common.errors import UserError

BUILT, NOT_BUILT, FAILED = "built", "not_built", "failed"
EXIT_BUILT, EXIT_NOT_BUILT, EXIT_BUILD_FAILED = 0, 3, 4
LOG_TAIL_LINES = 25
FINGERPRINT = ".fingerprint.json"
_RANK_FILE = re.compile(r"rank(\d+)[._]")  # rank{r}.engine, rank{r}_managed_weights.safetensors
RANK_RECORDS = ".ranks"


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
        raise UserError(f"{cfg_path} is not a TensorRT-LLM checkpoint config ({e})") from None
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


def _check_options_against_checkpoint(opts: EngineOptions, config: dict) -> None:
    quant = (config.get("quantization") or {}).get("quant_algo")
    for name, needs in (("gemm_plugin", {"fp8": "FP8", "nvfp4": "NVFP4"}),
                        ("gemm_swiglu_plugin", {"fp8": "FP8"}),
                        ("low_latency_gemm_plugin", {"fp8": "FP8"})):
        value = getattr(opts, name)
        if value in needs and quant != needs[value]:
            raise UserError(f"{SPECS[name].flag} {value} needs a checkpoint quantized as "
                            f"{needs[value]} (its scaling factors), but this checkpoint's "
                            f"quant_algo is {quant}")


def _fingerprint(checkpoint_dir: Path, args: dict) -> dict:
    h = hashlib.sha256((Path(checkpoint_dir) / "config.json").read_bytes())
    h.update(json.dumps(args, sort_keys=True).encode())
    return {"sha256": h.hexdigest()}


def _gpu_label(gpu: dict) -> str:
    return f"{gpu['name']} (compute capability {gpu['compute_capability']})"


def _same_gpu(a: dict | None, b: dict | None) -> bool:
    return a is None or b is None or (a["name"], a["compute_capability"]) == \
        (b["name"], b["compute_capability"])


def _host_gpu(backend: Backend, devices: list[str]) -> dict | None:
    """The GPU type this run builds on; a host mixing GPU types in one run is refused."""
    gpus = {d: backend.gpu(d) for d in devices}
    known = [(d, g) for d, g in gpus.items() if g is not None]
    for d, g in known[1:]:
        if not _same_gpu(known[0][1], g):
            raise UserError(f"GPU {known[0][0]} is {_gpu_label(known[0][1])} but GPU {d} is "
                            f"{_gpu_label(g)}: the engines of one model must be built on one GPU "
                            f"type; set CUDA_VISIBLE_DEVICES to GPUs of the same type")
    return known[0][1] if known else None


def _read_records(stage: Path) -> dict:
    out = {}
    for p in sorted((stage / RANK_RECORDS).glob("rank*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _prepare_stage(stage: Path, engines_dir: Path, fingerprint: dict, gpu: dict | None,
                   subset: bool, force: bool) -> None:
    """Make ``engines.partial`` ready for this run's ranks: a full run starts it afresh; a rank
    subset joins it if it holds ranks of the same inputs built on the same GPU type."""
    if not subset or (force and not _read_records(stage)):
        _rmtree(stage)
    elif stage.exists():
        fp = stage / FINGERPRINT
        try:
            old = json.loads(fp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            if not force:
                raise UserError(f"{stage} holds ranks built from another checkpoint or with other "
                                f"engine options; use the same ones, or pass --force to discard "
                                f"them")
            _rmtree(stage)
        else:
            for r, rec in sorted(_read_records(stage).items()):
                if not _same_gpu(rec.get("gpu"), gpu):
                    raise UserError(
                        f"{stage / f'rank{r}.engine'} was built on {_gpu_label(rec['gpu'])} "
                        f"(host {rec.get('host')}) but this host's GPU is {_gpu_label(gpu)}: "
                        f"TensorRT engines run only on the GPU type they were built for "
                        f"(NVIDIA/TensorRT-LLM#222); build these ranks on a host with that GPU, "
                        f"or rebuild every rank here with --force")
    (stage / "logs").mkdir(parents=True, exist_ok=True)
    (stage / RANK_RECORDS).mkdir(exist_ok=True)
    (stage / FINGERPRINT).write_text(json.dumps(fingerprint), encoding="utf-8")


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


def _land(work: Path, stage: Path, ranks: list[RankBuild], version: str | None) -> None:
    """Move this run's finished ranks (engines, rank 0's config.json, logs) into the stage and
    record where each was built; each file is one rename."""
    host = socket.gethostname()
    for rb in ranks:
        names = [p.name for p in work.iterdir() if p.is_file() and (
            _RANK_FILE.match(p.name) and _RANK_FILE.match(p.name).group(1) == str(rb.rank)
            or rb.rank == 0 and not _RANK_FILE.match(p.name))]  # rank 0: config.json & co
        for name in names:
            os.replace(work / name, stage / name)
        os.replace(rb.log, stage / "logs" / rb.log.name)
        rb.log = stage / "logs" / rb.log.name
        record = {"rank": rb.rank, "host": host, "device": rb.device, "gpu": rb.gpu,
                  "tensorrt_llm": version}
        tmp = stage / RANK_RECORDS / f".rank{rb.rank}.json.tmp"
        tmp.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, stage / RANK_RECORDS / f"rank{rb.rank}.json")


def _complete(stage: Path, world: int) -> bool:
    return (stage / "config.json").is_file() and all(
        (stage / f"rank{r}.engine").is_file() for r in range(world))


# --- the stage ---------------------------------------------------------------------------------

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
    subset = len(todo) < world
    _check_options_against_checkpoint(opts, config)
    lengths = effective_lengths(opts, config)
    if subset:
        hint_flags = tuple(hint_flags) + ("--ranks", f"{todo[0]}-{todo[-1]}")
    hint = engine_command_hint(checkpoint_dir, engines_dir.parent, opts, hint_flags)
    backend = backend if backend is not None else TrtllmBackend()

    avail = check_trtllm(backend)
    if not avail.ok:
        reason = " ".join(avail.reason.split())  # one line, whatever an import error printed
        msg = f"Engines were not built because {reason}; to build them on a GPU host run: {hint}"
        return EngineBuildResult(NOT_BUILT, msg, hint, trtllm_version=avail.version,
                                 seconds=time.perf_counter() - t0, world_size=world,
                                 lengths=lengths)

    if engines_dir.exists() and not force:
        raise UserError(f"{engines_dir} already exists; pass --force to replace it")
    stage = engines_dir.with_name(engines_dir.name + ".partial")
    failed_logs = engines_dir.with_name(engines_dir.name + ".failed-logs")
    device_ids = visible_device_ids(max(1, min(opts.build_workers, len(todo), avail.gpus))) \
        or ["0"]
    gpu = _host_gpu(backend, device_ids)
    args = trtllm_build_args(opts)
    _prepare_stage(stage, engines_dir, _fingerprint(checkpoint_dir, args), gpu, subset, force)
    if force and subset:
        _rmtree(engines_dir)  # a full run replaces it only once complete (swap_into_place)
    # this run's private directory: TensorRT-LLM writes here, finished ranks are then moved
    work = stage / f".run-{todo[0]}-{todo[-1]}-{os.getpid()}"
    _rmtree(work)
    (work / "logs").mkdir(parents=True)
    try:
        builds = _run_ranks(backend, checkpoint_dir, work, args, todo, device_ids, gpu, progress)
    except BaseException:
        _rmtree(work)
        raise

    if any(rb.status != "built" for rb in builds):
        return _failed(builds, work, stage, engines_dir, failed_logs, force, subset, hint, avail,
                       world, t0)
    _land(work, stage, builds, avail.version)
    _rmtree(work)
    records = _read_records(stage)
    complete = _complete(stage, world) and _promote(stage, engines_dir, world)
    if complete:
        for rb in builds:
            rb.log = engines_dir / "logs" / rb.log.name
    _rmtree(failed_logs)
    seconds = time.perf_counter() - t0
    which = f"rank(s) {todo[0]}-{todo[-1]} of {world}" if subset else f"{world} rank(s)"
    if complete:
        msg = (f"{engines_dir} ({which}, TensorRT-LLM {avail.version}, "
               f"{len(device_ids)} in parallel) in {seconds:.1f}s")
    else:
        missing = [r for r in range(world) if r not in records]
        msg = (f"{which} built into {stage} in {seconds:.1f}s; {engines_dir} appears "
               f"when the other ranks are built there too (missing: {_ranges(missing)})")
    return EngineBuildResult(BUILT, msg, hint, engines_dir=engines_dir if complete else None,
                             logs_dir=(engines_dir if complete else stage) / "logs",
                             trtllm_version=avail.version, ranks=builds, seconds=seconds,
                             complete=complete, world_size=world, built_on=records,
                             lengths=lengths)


def _promote(stage: Path, engines_dir: Path, world: int, wait_s: float = 120.0) -> bool:
    """Rename the complete stage to ``engines_dir`` (replacing an old one only now). Two runs
    landing their last ranks at once: the one that creates ``engines.lock`` renames, the other
    waits for the result."""
    lock = engines_dir.with_name(engines_dir.name + ".lock")
    try:
        lock.mkdir()
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while lock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return _complete(engines_dir, world)
    try:
        if not stage.is_dir():  # promoted by a run that took the lock just before us
            return _complete(engines_dir, world)
        (stage / FINGERPRINT).unlink(missing_ok=True)
        swap_into_place(stage, engines_dir)
        return True
    finally:
        lock.rmdir()


def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _failed(builds, work, stage, engines_dir, failed_logs, force, subset, hint, avail, world,
            t0) -> EngineBuildResult:
    _rmtree(failed_logs)
    os.replace(work / "logs", failed_logs)
    _rmtree(work)
    if not subset:
        _rmtree(stage)
    if force:
        _rmtree(engines_dir)
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
    return EngineBuildResult(FAILED, msg, hint, logs_dir=failed_logs,
                             trtllm_version=avail.version, ranks=builds,
                             seconds=time.perf_counter() - t0, log_tail=tail, world_size=world)
