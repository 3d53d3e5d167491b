"""The TensorRT-LLM checkpoint step: the layout a format and a tp/pp take (checked once, before any
work), then plan -> calibrate (calibrated formats) -> write."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from convert.convert import (plan_checkpoint, promote, refuse_nonfinite, wanted_ranks,
                             write_checkpoint)
from convert.moe import MoeLayout, moe_layout
from model.families import FAMILIES
from model.shape import Shape, preflight
from quantize.apply import preflight_quant, vocab_multiple


@dataclass(frozen=True)
class Layout:
    """How the checkpoint is split: tp x pp, the experts' split, and the model's shape as laid out
    (head padding for tp, the format's vocabulary multiple)."""

    tp: int
    pp: int
    shape: Shape
    moe: MoeLayout | None
    moe_tp: int | None = None
    moe_ep: int | None = None
    pad_heads: bool = False


@dataclass
class CheckpointResult:
    """A written (or, with --ranks, partly written) checkpoint: its config.json, the seconds spent
    calibrating and computing the quantized tensors, and what calibration chose. ``staged``: the
    complete checkpoint is still in ``out_dir.partial`` (``promote=False``) and ``put_in_place``
    finishes it."""

    config: dict
    timings: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    staged: bool = False
    put_in_place: object = None


def plan_layout(model, *, tp: int = 1, pp: int = 1, quant=None, moe_tp: int | None = None,
                moe_ep: int | None = None, pad_heads: bool = False) -> Layout:
    """Refuse a parallel layout or quantization format the model cannot take (one line, before any
    weight is read or any calibration). With ``pad_heads`` the shape carries the head padding tp
    needs (``shape.padding``; None if none); with a weight-only / AWQ format, the MLP's padded
    intermediate features (``shape.padded_inter``; quantize.apply.pad_features)."""
    no_kv_dup = quant is not None and not quant.format.kv_duplication
    shape = preflight(model.shape, tp, pp, pad_heads=pad_heads, no_kv_duplication=no_kv_dup)
    moe = moe_layout(shape, tp, moe_tp, moe_ep)
    shape = preflight_quant(quant, shape, tp, pp,
                            lambda: valid_tps(model, quant, pad_heads=pad_heads, upto=max(8, tp)))
    if shape.experts and quant is not None:
        quant.format.moe.preflight(quant, shape, moe)
    return Layout(tp, pp, replace(shape, vocab_multiple=vocab_multiple(quant)), moe, moe_tp,
                  moe_ep, pad_heads)


def valid_tps(model, quant, *, pad_heads: bool, upto: int) -> list[int]:
    """The --tp values up to ``upto`` that ``model`` and ``quant`` take (pp 1)."""
    from common.errors import UserError

    out = []
    for t in range(1, upto + 1):
        try:
            no_kv_dup = quant is not None and not quant.format.kv_duplication
            shape = preflight(model.shape, t, 1, pad_heads=pad_heads, no_kv_duplication=no_kv_dup)
            preflight_quant(quant, shape, t, 1)
        except UserError:
            continue
        out.append(t)
    return out


def quantization_block(quant, shape: Shape) -> dict | None:
    """The checkpoint config's ``quantization`` (mixture-of-experts routers added to its
    exclusions); None for float."""
    if quant is None or not quant.format.quantized(quant):
        return None
    quantization = quant.to_trtllm_quantization()
    if shape.experts and quantization and "exclude_modules" in quantization:
        quantization["exclude_modules"] = quant.format.moe.exclude_modules(quant, shape)  # + routers
    extra = FAMILIES[shape.family].unquantized  # linears the family's converter keeps float
    if extra and quantization and quantization.get("exclude_modules") is not None:
        quantization["exclude_modules"] = [*quantization["exclude_modules"],
                                           *(p for p in extra if p not in quantization["exclude_modules"])]
    return quantization


def convert_checkpoint(model, out_dir, layout: Layout, quant, *, dtype: str = "auto",
                       workers: int = 1, force: bool = False, progress: bool = True, ranks=None,
                       calibration=None, digests=None, allow_nonfinite: bool = False,
                       promote_now: bool = True) -> CheckpointResult:
    """Write the TRT-LLM checkpoint of ``model`` (a ModelSource) to ``out_dir``.

    Weight-only formats stream the float weights and only declare ``quant_algo`` (trtllm-build
    quantizes them); calibrated formats calibrate first (``calibration``: a
    ``quantize.run.CalibrationRun``; without one a default one calibrates into a store next to
    ``out_dir`` that is removed once the checkpoint is written) and write the quantized linears.
    ``ranks``: write only these ranks (convert.convert); the checkpoint is in ``out_dir`` once
    every rank is, else in ``out_dir.partial``. ``digests``: the run's ``common.digests.Digests``.
    ``allow_nonfinite``: NaN/Inf weights and float16 overflows are kept instead of refused (a
    calibrated format checks the weights before calibrating, the float path while it writes).
    ``promote_now=False``: a complete checkpoint of every rank stays in ``out_dir.partial`` for
    the run's checks (``result.staged``); ``result.put_in_place()`` then promotes it."""
    out_dir = Path(out_dir)
    cplan = plan_checkpoint(model, out_dir, layout.shape, tp=layout.tp, pp=layout.pp, dtype=dtype,
                            moe=layout.moe, moe_tp=layout.moe_tp, moe_ep=layout.moe_ep,
                            pad_heads=layout.pad_heads,
                            quantization=quantization_block(quant, layout.shape), force=force)
    calibrated = quant.name if quant is not None and quant.format.calibration(quant) else None
    result = CheckpointResult(cplan.config)
    on_complete = None
    if quant is not None and quant.format.from_weights:
        # quantized from each rank's float weights when written: deterministic per rank (resume
        # and --ranks work), computed in this process
        from quantize.from_weights import quantize_plans

        quantize_plans(cplan, layout.shape, quant)
        workers = 1
    if quant is not None and quant.format.stages_from_source:
        # a pre-quantized source: its packed linears' tensors cut per rank when written
        quant.format.stage_plans(cplan, quant)
        workers = 1
    if calibrated:
        from .calibration import calibrate_into_plan, calibration_run

        wanted_ranks(ranks, len(cplan.plans), calibrated)  # its refusal, before any work
        if not allow_nonfinite:  # calibrating NaN weights would waste the calibration
            refuse_nonfinite(cplan.source.scan())
        calibration = calibration_run(calibration, quant, layout.shape, out_dir)
        done = calibrate_into_plan(model, cplan, layout.shape, quant, calibration,
                                   progress=progress)
        result = CheckpointResult(cplan.config, done["timings"], done["report"])
        on_complete = calibration.done if calibration is not None else None
    write_checkpoint(cplan, ranks=ranks, workers=workers, force=force, progress=progress,
                     calibrated=calibrated, options=repr(quant), on_complete=on_complete,
                     digests=digests, allow_nonfinite=allow_nonfinite, promote=promote_now)
    if not promote_now and not wanted_ranks(ranks, len(cplan.plans), calibrated)[1]:

        def put_in_place():
            promote(out_dir, digests)
            if on_complete is not None:
                on_complete()

        result.staged, result.put_in_place = True, put_in_place
    return result
