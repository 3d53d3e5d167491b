"""HF model dir → TRT-LLM checkpoint dir (config.json + rank{r}.safetensors), streaming.

Order of work: read the config, check the parallel layout, plan every rank (every source tensor
located and shape-checked), and only then read weights. Files go to ``<out>.partial/`` and the
directory is renamed to ``<out>`` when every rank is complete and read back. A run interrupted
(Ctrl-C, SIGTERM) keeps ``<out>.partial/`` with its finished ranks; a rerun with the same inputs
and options redoes only the unfinished ones. A run that fails for any other reason removes it.

``ranks`` (``--ranks A-B``, one node of a multi-node world) writes only those ranks (and the
whole world's config.json) into ``<out>.partial/``, which runs for other ranks share; the run
that writes the last rank renames it. Its fingerprint leaves out file times (each node has its
own copy of the model), a different one is refused instead of discarded (it holds other nodes'
work), and a failing run removes only its own unfinished files.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from common.fileio import reusing_buffers

from common import interrupt
from common.errors import UserError
from common.interrupt import Interrupted
from common.staged import StagedOutput
from .hf_config import from_hugging_face, model_shape, pp_layer_range, preflight, read_hf_config
from .moe import MoeLayout, moe_layout
from .plan import rank_plan
from .source import SourceCheckpoint
from .writer import iter_chunks, nbytes, wait_durable, write_file
from quantize.apply import MemoryTensor, StagedTensor, preflight_quant, vocab_multiple

FINGERPRINT = "fingerprint.json"


def _write_rank(model_dir: str, plan, path: str, rank: int, progress: bool,
                parallel: bool = False, digests=None) -> str:
    source = SourceCheckpoint(model_dir)
    total = sum(nbytes(t.shape, t.dtype) for t in plan)
    tmp = Path(path + ".tmp")
    # one line per rank only when ranks run side by side: a bar at position r > 0 leaves the
    # cursor mid-line, and what the run prints next would start there
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"rank {rank}",
              position=rank if parallel else None, leave=False, disable=not progress) as bar:
        def produce(t):
            bar.set_postfix_str(t.name.replace("transformer.", ""), refresh=False)
            if isinstance(t, (MemoryTensor, StagedTensor)):  # calibrated weights and scales
                yield t.tensor
                return
            for piece in t.pieces:
                yield from iter_chunks(source, piece, t.dtype, spans=True)

        def on_bytes(n):
            bar.update(n)
            interrupt.check()

        try:
            # returns before the fsync: rank r+1 is written while rank r is fsynced, and the
            # rename that marks rank r complete follows its fsync (wait_durable)
            write_file(tmp, plan, produce, on_bytes=on_bytes, then=lambda: os.replace(tmp, path),
                       digests=digests)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _write_rank_durable(*job) -> str:
    """_write_rank in a worker process: returns once the rank is fsynced and renamed."""
    path = _write_rank(*job)
    wait_durable()
    return path


def _fingerprint(config: dict, plans, source: SourceCheckpoint, quant=None,
                 mtimes: bool = True) -> dict:
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(repr(quant).encode())
    for plan in plans:
        for t in plan:
            h.update(repr((t.name, t.shape, str(t.dtype), [asdict(p) for p in t.pieces])).encode())
    for f in source.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns if mtimes else ''}".encode())
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


def preflight_conversion(model_dir, *, tp: int = 1, pp: int = 1, quant=None,
                         moe_tp: int | None = None, moe_ep: int | None = None,
                         pad_heads: bool = False):
    """Read the model's config and refuse a parallel layout or quantization format it cannot take
    (one line, before any weight is read or any calibration); return (HF config, Shape). With
    ``pad_heads`` the Shape carries the head padding tp needs (``shape.padding``; None if none)."""
    hf = read_hf_config(Path(model_dir))
    sq = quant is not None and (quant.quant_algo or "").startswith("W8A8_SQ")  # no kv duplication
    shape = preflight(model_shape(hf), tp, pp, pad_heads=pad_heads, no_kv_duplication=sq)
    moe = moe_layout(shape, tp, moe_tp, moe_ep)
    preflight_quant(quant, shape, tp, pp)
    if shape.experts and quant is not None and quant.quant_algo is not None:
        # quantize.moe imports torch: not on the float path (it checks quantized experts only)
        from quantize.moe import preflight_moe_quant

        preflight_moe_quant(quant, shape, moe)
    return hf, shape


def convert_checkpoint(model_dir, out_dir, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
                       workers: int = 1, force: bool = False, progress: bool = True,
                       quantization: dict | None = None, quant=None,
                       calibrated_model=None, timings: dict | None = None,
                       ranks=None, moe_tp: int | None = None,
                       moe_ep: int | None = None, pad_heads: bool = False,
                       quant_report: dict | None = None, calibration=None, digests=None) -> dict:
    """Write the TRT-LLM checkpoint of ``model_dir`` to ``out_dir``; return its config.

    ``quant``: a ``quantize.formats.QuantSpec``. Weight-only formats stream the float weights
    and only declare ``quant_algo`` (trtllm-build quantizes them); calibrated formats
    (SmoothQuant, FP8, AWQ, KV cache) calibrate the model with modelopt first (or use
    ``calibrated_model``, already calibrated for ``quant``) and write modelopt's tensors for the
    quantized linears. ``quantization``: a raw ``quantization`` block (no calibration; for tests
    and benchmarks), ignored when ``quant`` is given. ``timings``: a dict that receives the
    seconds spent calibrating (``calibration``) and computing the quantized tensors
    (``quantized_tensors``). ``ranks``: write only these ranks (see the module docstring); the
    checkpoint is in ``out_dir`` once every rank is, else in ``out_dir.partial``.
    ``moe_tp``/``moe_ep``: the experts' split of a mixture-of-experts
    model (``convert.moe``; default moe_tp = tp, moe_ep = 1). ``pad_heads``: pad the attention
    heads exactly when tp does not divide them (``convert.heads``); a no-op when it does.
    ``quant_report``: a dict that receives what calibration chose (the
    SmoothQuant plugin recipe's per-layer ``alphas`` and alpha-search errors).
    ``calibration``: a ``quantize.run.CalibrationRun`` (layer-wise calibration from the
    safetensors: where its store is, reuse, device, text, tokenizer); without one (and without
    ``calibrated_model``) a default one calibrates into a store next to ``out_dir`` that is
    removed once the checkpoint is written. ``digests``: the run's ``common.digests.Digests``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf, shape = preflight_conversion(model_dir, tp=tp, pp=pp, quant=quant, moe_tp=moe_tp,
                                     moe_ep=moe_ep, pad_heads=pad_heads)
    moe = moe_layout(shape, tp, moe_tp, moe_ep)
    shape = replace(shape, vocab_multiple=vocab_multiple(quant))
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose another --output or pass --force to "
                        f"replace it")
    config = _checkpoint_config(hf, shape, quant, quantization, dtype=dtype, tp=tp, pp=pp,
                                moe_tp=moe_tp, moe_ep=moe_ep, pad_heads=pad_heads)
    source = SourceCheckpoint(model_dir)
    world = tp * pp
    calibrated = quant is not None and quant.needs_calibration
    wanted, subset = _wanted_ranks(ranks, world, quant if calibrated else None)
    if subset and force:
        shutil.rmtree(out_dir, ignore_errors=True)  # a new generation is being written
    plans = [rank_plan(shape, source, tp=tp, pp=pp, rank=r, dtype=config["dtype"], moe=moe)
             for r in range(world)]
    calibration = _calibration_run(calibration, calibrated, calibrated_model, shape, out_dir)
    if calibrated:
        plans = _calibrated_plans(model_dir, source, plans, shape, quant, config,
                                  calibrated_model, calibration, out_dir, progress,
                                  timings if timings is not None else {},
                                  quant_report if quant_report is not None else {})
        workers = 1  # the calibrated tensors are in this process's memory
    fingerprint = _fingerprint(config, plans, source, quant, mtimes=not subset)
    tmp = _staging_dir(out_dir, fingerprint, calibrated=calibrated, subset=subset, force=force)
    todo = [r for r in wanted if not (tmp / f"rank{r}.safetensors").is_file()]
    _write_staged(model_dir, out_dir, tmp, plans, config, todo=todo, subset=subset,
                  workers=workers, progress=progress, calibration=calibration, digests=digests)
    return config


def _wanted_ranks(ranks, world: int, calibrated_quant) -> tuple[list[int], bool]:
    """(the ranks this run writes, whether that is a subset of the world); a calibrated format
    (``calibrated_quant``, else None) cannot be split over runs."""
    wanted = list(range(world)) if ranks is None else sorted(ranks)
    subset = len(wanted) < world
    if subset and calibrated_quant is not None:
        raise UserError(f"--ranks cannot split a calibrated format ({calibrated_quant.name}) over "
                        "runs: the ranks of two calibrations must not be mixed; convert every "
                        "rank in one run (CPU only) and use --ranks with --from-checkpoint for "
                        "the engines")
    return wanted, subset


def _write_staged(model_dir: Path, out_dir: Path, tmp: Path, plans, config: dict, *, todo,
                  subset: bool, workers: int, progress: bool, calibration, digests=None) -> None:
    """Write ranks ``todo`` and config.json into the staging dir ``tmp``; once every rank of the
    world is there, check the files and swap ``tmp`` into ``out_dir``. Interrupted: the finished
    ranks stay in ``tmp`` for a rerun; any other failure removes this run's files."""
    try:
        with interrupt.deferred():
            _run_ranks(model_dir, plans, tmp, todo, workers, progress, digests)
        _write_config(tmp, config)
        if not all((tmp / f"rank{r}.safetensors").is_file() for r in range(len(plans))):
            return  # other ranks are still to come (--ranks)
        _verify_files(tmp, plans)
        _staged(out_dir).promote()  # an existing one only with --force (checked by the caller)
        if calibration is not None:
            calibration.done()
    except (KeyboardInterrupt, Interrupted):
        # only this run's unfinished files: with --ranks, other runs may be writing theirs
        _discard(out_dir, todo)
        raise Interrupted(f"interrupted: finished ranks are kept in {tmp}; rerun the same command "
                          f"to finish only the remaining ranks")
    except OSError as e:
        _discard(out_dir, todo if subset else None)
        raise UserError(f"cannot write the checkpoint to {out_dir.parent}: {e.strerror or e}; "
                        f"free space or choose another --output")
    except BaseException:
        _discard(out_dir, todo if subset else None)
        raise


def _checkpoint_config(hf, shape, quant, quantization, **layout) -> dict:
    """The checkpoint's config.json: from_hugging_face with the format's quantization block
    (mixture-of-experts routers added to its exclusions) and the (AWQ-padded) vocabulary."""
    if quant is not None:
        quantization = quant.to_trtllm_quantization() if quant.is_quantized else None
        if shape.experts and quantization and "exclude_modules" in quantization:
            from quantize.moe import moe_exclude_modules

            quantization["exclude_modules"] = moe_exclude_modules(quant, shape)  # + routers
    config = from_hugging_face(hf, quantization=quantization, **layout)
    config["vocab_size"] = shape.padded_vocab  # AWQ: padded as modelopt's export writes it
    return config


def _calibration_run(calibration, calibrated: bool, calibrated_model, shape, out_dir: Path):
    """The layer-wise calibration of this conversion, or None: every calibrated format on dense
    models goes layer by layer (a default run into a temporary store when none is given);
    mixture-of-experts models and an already calibrated model do not."""
    layerwise = calibrated and calibrated_model is None and not shape.experts
    if not layerwise:
        if calibration is not None and calibration.reuse and calibrated:
            raise UserError("--calibration reuses a layer-wise calibration; a mixture-of-experts "
                            "model is calibrated whole: drop --calibration")
        return None
    if calibration is None:
        from quantize.run import CalibrationRun

        calibration = CalibrationRun(store=out_dir.with_name(out_dir.name + ".calibration"),
                                     temporary=True)
    return calibration


def _staged(out_dir: Path) -> StagedOutput:
    return StagedOutput(out_dir, record=FINGERPRINT)


def _staging_dir(out_dir: Path, fingerprint: dict, *, calibrated: bool, subset: bool,
                 force: bool) -> Path:
    """OUT.partial, holding the fingerprint of what is written into it: ranks of an earlier run
    of the same inputs and options are kept (resume, --ranks), others refused or discarded."""
    staged = _staged(out_dir)
    refuse = (f"{staged.stage} holds ranks converted from other inputs or options; rerun with "
              f"the same ones, or pass --force to discard them") if subset and not force else None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # never resume a calibrated run: calibration on a GPU is not bit-reproducible, and
        # ranks of two calibrations must not be mixed
        staged.open(fingerprint, resume=not calibrated, refuse=refuse)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir.parent}: {e.strerror or e}; "
                        f"choose another --output")
    return staged.stage


def _write_config(tmp: Path, config: dict) -> None:
    """config.json, written whole under a temporary name (runs for other ranks write the same)."""
    part = tmp / f".config.json.{os.getpid()}.tmp"
    part.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(part, tmp / "config.json")


def _discard(out_dir: Path, own_ranks) -> None:
    """After a failure: the whole work dir, or with --ranks only this run's unfinished files."""
    _staged(out_dir).discard(None if own_ranks is None else
                             [f"rank{r}.safetensors.tmp" for r in own_ranks])


def _calibrated_plans(model_dir: Path, source, plans, shape, quant, config: dict,
                      calibrated_model, calibration, out_dir: Path, progress: bool,
                      timings: dict, report: dict):
    """Calibrate on the calibration text, then put each rank's quantized linears and KV-cache
    scales into its plan: dense models layer by layer from the safetensors into a calibration
    store that the writer streams from (``calibration``; modelopt's formats, or TensorRT-LLM's
    plugin SmoothQuant by forward hooks: quantize.sq_layerwise); a model calibrated in memory
    (``calibrated_model``: a modelopt-calibrated model or a ``PluginCalibration``), or a
    mixture-of-experts model (loaded whole: its experts have no layer-wise path yet), from the
    calibrated model."""
    from quantize.apply import LayerShards, apply_to_plan, stage_tensors

    from .heads import pad_quant_state
    from .plan import TORCH_DTYPES

    dtype = TORCH_DTYPES[config["dtype"]]
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]

    def planned(rank_tensors):  # rank_tensors(tp_rank, layers) -> the rank's staged tensors
        out = []
        for r, plan in enumerate(plans):
            pp_rank, tp_rank = divmod(r, tp)
            out.append(apply_to_plan(plan, rank_tensors(tp_rank, pp_layer_range(shape.layers, pp,
                                                                                pp_rank))))
        return out

    t0 = time.perf_counter()
    if calibration is not None:
        load_layer = calibration.calibrate(model_dir, source, quant, progress=progress,
                                           timings=timings)
        t1 = time.perf_counter()
        if quant.is_sq_plugin:
            shards = _sq_plugin_shards(calibration.store, load_layer, shape, quant, config,
                                       report, dtype)
        else:  # calibrated on the real heads, then padded (per layer)
            shards = LayerShards(lambda i: pad_quant_state(load_layer(i, dtype), shape.padding),
                                 quant, num_heads=shape.tp_heads, num_kv_heads=shape.tp_kv_heads,
                                 tp=tp)
        out = planned(lambda tp_rank, layers: shards.staged(layers, tp_rank))
        timings.update(quantized_tensors=time.perf_counter() - t1)
        return out
    if quant.is_sq_plugin:
        rank_tensors = _sq_plugin_tensors(shape, quant, config, calibrated_model, report, dtype)
    else:
        rank_tensors = _modelopt_tensors(model_dir, shape, quant, config, calibrated_model,
                                         progress, dtype)
    t1 = time.perf_counter()
    out = planned(lambda tp_rank, layers: stage_tensors(rank_tensors(tp_rank), layers))
    timings.update(calibration=t1 - t0, quantized_tensors=time.perf_counter() - t1)
    return out


def _sq_plugin_shards(store, load_layer, shape, quant, config, report, dtype):
    """TensorRT-LLM's plugin SmoothQuant from a layer-wise calibration store: each layer read
    back, its heads padded, cut per rank (quantize.apply.LayerShards)."""
    from quantize.apply import LayerShards
    from quantize.smoothquant import plugin_layer_tensors, smoothquant_val
    from quantize.sq_layerwise import stored_alphas, stored_layer

    from .heads import pad_sq_plugin_layers

    alphas, search = stored_alphas(store, shape.layers)
    config["quantization"]["smoothquant_val"] = smoothquant_val(alphas)
    report.update(alphas=alphas, **({"alpha_search": search} if search else {}))
    tp = config["mapping"]["tp_size"]
    heads = dict(num_heads=shape.tp_heads, num_kv_heads=shape.tp_kv_heads)

    def load(i):  # calibrated on the real heads, then padded
        return pad_sq_plugin_layers([stored_layer(load_layer(i, dtype), quant.quant_algo)],
                                    shape.padding)[0]

    def shard(i, layer, tp_rank):
        return plugin_layer_tensors(i, layer, quant, tp=tp, rank=tp_rank, norm_dtype=dtype, **heads)
    return LayerShards(load, quant, tp=tp, shard=shard, **heads)


def _sq_plugin_tensors(shape, quant, config, cal, report, dtype):
    """TensorRT-LLM's plugin SmoothQuant from a whole-model ``PluginCalibration``
    (``quantize.smoothquant.calibrate_plugin``, the reference): pad, and return the per-rank
    tensor function."""
    from quantize.smoothquant import plugin_rank_tensors

    from .heads import pad_sq_plugin_layers

    config["quantization"]["smoothquant_val"] = cal.smoothquant_val
    report.update(alphas=list(cal.alphas), **({"alpha_search": cal.search} if cal.search else {}))
    sq_layers = pad_sq_plugin_layers(cal.layers, shape.padding)  # calibrated on the real heads
    tp = config["mapping"]["tp_size"]
    return lambda tp_rank: plugin_rank_tensors(sq_layers, quant, num_heads=shape.tp_heads,
                                               num_kv_heads=shape.tp_kv_heads, tp=tp,
                                               rank=tp_rank, norm_dtype=dtype)


def _modelopt_tensors(model_dir, shape, quant, config, calibrated_model, progress, dtype):
    """modelopt's formats from a whole calibrated model (given, or loaded and calibrated here):
    the per-rank tensor function (dense and expert tensors, heads padded)."""
    from quantize.calibrate import calibrate
    from quantize.modelopt_state import extract_quant_state, shard_quant_state
    from quantize.moe import extract_moe_state, shard_moe_state

    from .heads import pad_quant_state

    model = calibrated_model
    if model is None:
        model = calibrate(model_dir, quant, progress=progress)
    state = extract_quant_state(model, quant, dtype=dtype)
    moe_state = extract_moe_state(model, quant, dtype) if shape.experts else {}
    del model
    state = pad_quant_state(state, shape.padding)  # calibrated on the real heads, then padded
    mapping = config["mapping"]
    tp = mapping["tp_size"]
    moe = MoeLayout(mapping.get("moe_tp_size", tp), mapping.get("moe_ep_size", 1))

    def rank_tensors(tp_rank):
        tensors = shard_quant_state(state, quant, num_heads=shape.tp_heads,
                                    num_kv_heads=shape.tp_kv_heads, tp=tp, rank=tp_rank)
        tensors.update(shard_moe_state(moe_state, moe, tp_rank, shape.experts))
        return tensors
    return rank_tensors


def _run_ranks(model_dir, plans, tmp: Path, todo, workers: int, progress: bool,
               digests=None) -> None:
    jobs = [(str(model_dir), plans[r], str(tmp / f"rank{r}.safetensors"), r, progress)
            for r in todo]
    if workers <= 1 or len(jobs) <= 1:
        try:
            with reusing_buffers():  # one set of staging buffers for every rank
                for job in jobs:
                    _write_rank(*job, digests=digests)  # worker processes: hashed from disk
        except BaseException:
            wait_durable(raise_errors=False)
            raise
        wait_durable()
        return
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                  initializer=_worker_init, initargs=(ctx.RLock(),))
    futures = [pool.submit(_write_rank_durable, *job, True) for job in jobs]
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


def _worker_init(lock) -> None:
    tqdm.set_lock(lock)
    interrupt.install()
    interrupt._state["deferred"] = 1
