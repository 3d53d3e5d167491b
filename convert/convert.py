"""HF model dir → TRT-LLM checkpoint dir (config.json + rank{r}.safetensors), streaming.

Order of work: read the config, check the parallel layout, plan every rank (every source tensor
located and shape-checked), and only then read weights. Files go to ``<out>.partial/`` and the
directory is renamed to ``<out>`` when every rank is complete and read back. A run interrupted
(Ctrl-C, SIGTERM) keeps ``<out>.partial/`` with its finished ranks; a rerun with the same inputs
and options redoes only the unfinished ones. A run that fails for any other reason removes it.

``ranks`` (``--ranks A-B``, one node of a multi-node world) writes only those ranks (and the
whole world's config.json) into ``<out>.partial/``, which runs for other ranks share; the run
that writes the last rank renames it. A different fingerprint is refused instead of discarded (it
holds other nodes' work), and a failing run removes only its own unfinished files. The
fingerprint holds no file names, sizes or times (each node has its own copy of the model): the
model is identified by its tensors' bytes (convert.stage).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from common.fileio import reusing_buffers

from common import interrupt
from common.atomic import write_text
from common.errors import IO_ERRNOS, UserError, io_error
from common.interrupt import Interrupted
from common.ownership import remove_owned
from .compute import computed_chunks
from .hf_config import from_hugging_face, padded_hidden_fields
from .plan import OutputTensor, rank_plan
from .source import SourceCheckpoint
from .source_files import declared_dtype
from .stage import FINGERPRINT, Stage, seal_rank, stage_digest, staged as _staged  # noqa: F401
from .writer import iter_chunks, nbytes, wait_durable, write_file

def _write_rank(model_dir: str, plan, path: str, rank: int, progress: bool,
                parallel: bool = False, digests=None, allow_nonfinite: bool = False) -> str:
    source = SourceCheckpoint(model_dir)
    if digests is None:  # a worker process: its digests go beside the rank (convert.stage)
        from common.digests import Digests

        digests = Digests()
    total = sum(nbytes(t.shape, t.dtype) for t in plan)
    tmp = Path(path + ".tmp")
    # one line per rank only when ranks run side by side: a bar at position r > 0 leaves the
    # cursor mid-line, and what the run prints next would start there
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"rank {rank}",
              position=rank if parallel else None, leave=False, disable=not progress) as bar:
        def produce(t):
            bar.set_postfix_str(t.name.replace("transformer.", ""), refresh=False)
            if not isinstance(t, OutputTensor):  # calibrated weights and scales (pipeline/)
                yield from t.chunks()  # as ByteChunks (quantize.apply)
                return
            if t.compute is not None:  # a function of its pieces (convert.compute)
                yield from computed_chunks(source, t)
                return
            for piece in t.pieces:
                yield from iter_chunks(source, piece, t.dtype, offset=t.offset,
                                       allow_nonfinite=allow_nonfinite, scale=t.scale)

        def on_bytes(n):
            bar.update(n)
            interrupt.check()

        try:
            # returns before the fsync: rank r+1 is written while rank r is fsynced, and the
            # rename that marks rank r complete follows its fsync (wait_durable)
            write_file(tmp, plan, produce, on_bytes=on_bytes, then=lambda: seal_rank(tmp, Path(path), digests),
                       digests=digests)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _write_rank_durable(*job, **kw) -> str:
    """_write_rank in a worker process: returns once the rank is fsynced and renamed."""
    path = _write_rank(*job, **kw)
    wait_durable()
    return path


def _fingerprint(config: dict, plans, options: str = "") -> dict:
    """The plan's structure: config, options, every rank's tensors and their slices of the
    source tensors (by name). The files that hold the source tensors are not in it: the
    weights' identity (convert.stage) is over the tensors, whatever files hold them."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(options.encode())
    for plan in plans:
        for t in plan:
            h.update(repr((t.name, t.shape, str(t.dtype), [asdict(p) for p in t.pieces])).encode())
            if getattr(t, "offset", 0):  # calibrated tensors (StagedTensor) have none
                h.update(repr(t.offset).encode())
            if getattr(t, "scale", 1.0) != 1.0:
                h.update(repr(("scale", t.scale)).encode())
            if getattr(t, "compute", None) is not None:
                h.update(repr(("compute", t.compute)).encode())
    return {"sha256": h.hexdigest()}


def _verify_files(tmp: Path, plans) -> None:
    """Read every written file back with safetensors and compare its index with the plan."""
    for rank, plan in enumerate(plans):
        # framework="numpy": reading the index needs no torch (float conversions never import it)
        with safe_open(str(tmp / f"rank{rank}.safetensors"), framework="numpy") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        want = {t.name: tuple(t.shape) for t in plan}
        if got != want:
            raise AssertionError(f"rank{rank}.safetensors does not hold the planned tensors")


@dataclass
class CheckpointPlan:
    """What a conversion writes: the checkpoint's config.json and every rank's tensors (streamed
    from ``source``, or computed in memory by a calibrated format: pipeline/ replaces them)."""

    model_dir: Path
    out_dir: Path
    config: dict
    plans: list
    source: SourceCheckpoint


def open_source(model) -> SourceCheckpoint:
    """The model's tensors: a pre-quantized directory's packed linears appear as virtual float
    weights (convert/prequant/source.py); a float model's as they are."""
    from .prequant.scheme import read_source_quant
    from .prequant.source import PrequantSource

    sq = read_source_quant(model.raw)
    if sq is not None:
        return PrequantSource(model.directory, sq, declared_dtype(model.raw))
    return SourceCheckpoint(model.directory, declared_dtype=declared_dtype(model.raw))


def plan_checkpoint(model, out_dir, shape, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
                    moe=None, moe_tp: int | None = None, moe_ep: int | None = None,
                    pad_heads: bool = False, quantization: dict | None = None,
                    force: bool = False) -> CheckpointPlan:
    """Plan the checkpoint of ``model`` (a ``model.source.ModelSource``) laid out as ``shape``
    (head padding and vocabulary multiple set, checked by the caller): config.json with the
    format's ``quantization`` block, every rank's float tensors located and shape-checked."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose another --output or pass --force to "
                        f"replace it")
    config = from_hugging_face(model.config, quantization=quantization, dtype=dtype, tp=tp, pp=pp,
                               moe_tp=moe_tp, moe_ep=moe_ep, pad_heads=pad_heads)
    config["vocab_size"] = shape.padded_vocab  # AWQ: padded as modelopt's export writes it
    config.update(padded_hidden_fields(config, shape))
    source = open_source(model)
    plans = [rank_plan(shape, source, tp=tp, pp=pp, rank=r, dtype=config["dtype"], moe=moe)
             for r in range(tp * pp)]
    return CheckpointPlan(model.directory, out_dir, config, plans, source)


def write_checkpoint(plan: CheckpointPlan, *, ranks=None, workers: int = 1, force: bool = False,
                     progress: bool = True, calibrated: str | None = None, options: str = "",
                     on_complete=None, digests=None, allow_nonfinite: bool = False,
                     promote: bool = True) -> dict:
    """Write ``plan`` (see the module docstring for staging, resume and ``ranks``); return its
    config. ``calibrated``: the name of the calibrated format whose tensors the plan holds (never
    resumed, never split over runs), else None. ``options``: what else decides the bytes, for the
    resume fingerprint. ``on_complete``: called once the checkpoint is in place. ``digests``: the
    run's ``common.digests.Digests``, told each rank file's digest as it is written.
    ``allow_nonfinite``: keep NaN/Inf source values and float16 overflows instead of refusing.
    ``promote=False`` (a run of every rank): the complete, read-back checkpoint stays in
    ``<out>.partial`` for the caller's checks, which then put it in place (:func:`promote`)."""
    world = len(plan.plans)
    wanted, subset = wanted_ranks(ranks, world, calibrated)
    if subset and force:
        remove_owned(plan.out_dir)  # a new generation is being written
    if calibrated:
        workers = 1  # the calibrated tensors are in this process's memory
    scan = plan.source.scan()  # in the background: the float path does not wait for it
    fingerprint = _fingerprint(plan.config, plan.plans, options)
    stage = Stage(plan.out_dir, fingerprint, scan, calibrated=bool(calibrated), subset=subset,
                   force=force)
    todo = [r for r in wanted if not stage.finished(r, digests)]
    _write_staged(plan.model_dir, plan.out_dir, stage, plan.plans, plan.config, todo=todo,
                  subset=subset, workers=workers, progress=progress, on_complete=on_complete,
                  digests=digests, allow_nonfinite=allow_nonfinite, promote=promote or subset)
    return plan.config


def promote(out_dir, digests=None) -> None:
    """Put the complete checkpoint staged in ``<out_dir>.partial`` in place (after its checks),
    replacing an earlier one of the tool's own."""
    _staged(Path(out_dir)).promote(digests)


def staged_dir(out_dir) -> Path:
    """Where ``out_dir`` is written until it is put in place."""
    return _staged(Path(out_dir)).stage


def convert_checkpoint(model_dir, out_dir, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
                       workers: int = 1, force: bool = False, progress: bool = True, ranks=None,
                       moe_tp: int | None = None, moe_ep: int | None = None,
                       pad_heads: bool = False, digests=None) -> dict:
    """The float TRT-LLM checkpoint of ``model_dir`` in ``out_dir`` (the library entry without
    quantization; build_engine's formats go through pipeline.checkpoint); return its config.
    ``digests``: a ``common.digests.Digests`` told each rank file's digest."""
    from model.shape import preflight
    from model.source import ModelSource

    from .moe import moe_layout

    model = ModelSource.open(model_dir)
    shape = preflight(model.shape, tp, pp, pad_heads=pad_heads)
    moe = moe_layout(shape, tp, moe_tp, moe_ep)
    cplan = plan_checkpoint(model, out_dir, shape, tp=tp, pp=pp, dtype=dtype, moe=moe,
                            moe_tp=moe_tp, moe_ep=moe_ep, pad_heads=pad_heads, force=force)
    return write_checkpoint(cplan, ranks=ranks, workers=workers, force=force, progress=progress,
                            options=repr(None), digests=digests)


def wanted_ranks(ranks, world: int, calibrated: str | None) -> tuple[list[int], bool]:
    """(the ranks this run writes, whether that is a subset of the world); a calibrated format
    (``calibrated``: its name, else None) cannot be split over runs."""
    wanted = list(range(world)) if ranks is None else sorted(ranks)
    subset = len(wanted) < world
    if subset and calibrated:
        raise UserError(f"--ranks cannot split a calibrated format ({calibrated}) over "
                        "runs: the ranks of two calibrations must not be mixed; convert every "
                        "rank in one run (CPU only) and use --ranks with --from-checkpoint for "
                        "the engines")
    return wanted, subset


def _write_staged(model_dir: Path, out_dir: Path, stage: Stage, plans, config: dict, *, todo,
                  subset: bool, workers: int, progress: bool, on_complete, digests=None,
                  allow_nonfinite: bool = False, promote: bool = True) -> None:
    """Write ranks ``todo`` and config.json into the staging dir; once every rank of the world is
    there, check the files (and the source's values) and swap the stage into ``out_dir`` (unless
    ``promote`` is False: the caller's checks run on the stage first). Interrupted: the finished
    ranks stay for a rerun; any other failure removes this run's files."""
    tmp = stage.dir
    try:
        with interrupt.deferred():
            _run_ranks(model_dir, plans, tmp, todo, workers, progress, digests, allow_nonfinite)
        _write_config(tmp, config)
        stage.record_weights()
        if not all((tmp / f"rank{r}.safetensors").is_file() for r in range(len(plans))):
            return  # other ranks are still to come (--ranks)
        _verify_files(tmp, plans)
        if not allow_nonfinite:
            refuse_nonfinite(stage.scan)
        stage.before_promote(len(plans))
        if not promote:
            return  # the caller's checks run on the stage, then it is put in place
        _staged(out_dir).promote(digests)  # an existing one: --force and the tool's own
        if on_complete is not None:
            on_complete()
    except (KeyboardInterrupt, Interrupted):
        # only this run's unfinished files: with --ranks, other runs may be writing theirs
        _discard(out_dir, todo)
        try:
            stage.record_weights()  # so that the rerun can prove the weights are the same
        except (OSError, UserError):
            pass
        raise Interrupted(f"interrupted: finished ranks are kept in {tmp}; rerun the same command "
                          f"to finish only the remaining ranks")
    except OSError as e:
        _discard(out_dir, todo if subset else None)
        if e.errno not in IO_ERRNOS:
            raise
        raise io_error(e, out_dir) from None
    except BaseException:
        _discard(out_dir, todo if subset else None)
        raise


def refuse_nonfinite(scan) -> None:
    """NaN or Inf among the model's values: refused naming the first tensor and the count."""
    bad = scan.nonfinite()
    if bad:
        name, count = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise UserError(f"tensor {name} of the model holds {count} NaN/Inf value(s){more}: the "
                        f"weights are damaged; re-download them, or pass --allow-nonfinite to "
                        f"convert them as they are")


def _write_config(tmp: Path, config: dict) -> None:
    """config.json, written whole under a temporary name (runs for other ranks write the same)."""
    write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")


def _discard(out_dir: Path, own_ranks) -> None:
    """After a failure: the whole work dir, or with --ranks only this run's unfinished files."""
    _staged(out_dir).discard(None if own_ranks is None else
                             [f"rank{r}.safetensors.tmp" for r in own_ranks])


def _run_ranks(model_dir, plans, tmp: Path, todo, workers: int, progress: bool,
               digests=None, allow_nonfinite: bool = False) -> None:
    kw = {"allow_nonfinite": True} if allow_nonfinite else {}
    jobs = [(str(model_dir), plans[r], str(tmp / f"rank{r}.safetensors"), r, progress)
            for r in todo]
    if workers <= 1 or len(jobs) <= 1:
        try:
            with reusing_buffers():  # one set of staging buffers for every rank
                for job in jobs:
                    _write_rank(*job, digests=digests, **kw)
        except BaseException:
            wait_durable(raise_errors=False)
            raise
        wait_durable()
        return
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                  initializer=_worker_init, initargs=(ctx.RLock(),))
    futures = [pool.submit(_write_rank_durable, *job, True, **kw) for job in jobs]
    try:
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_EXCEPTION)
            for fut in done:
                fut.result()
            interrupt.check()
    except BaseException:
        for fut in futures:
            fut.cancel()
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()  # a worker mid-write; its .tmp file is removed by the caller
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if digests is not None:  # what the workers hashed, so that build.json need not read it
        for _, _, path, _, _ in jobs:
            digests.record_path(path, stage_digest(Path(path)))


def _worker_init(lock) -> None:
    tqdm.set_lock(lock)
    interrupt.install_deferred()
