"""The conversion as the tests drive it: the production path (pipeline.checkpoint) plus what only
tests pass — a raw ``quantization`` block, an already ``calibrated_model`` (a modelopt-calibrated
model or the whole-model ``PluginCalibration`` reference), and dicts that receive the timings and
the calibration report. Returns the checkpoint's config.json as a dict, as the tests expect."""
from __future__ import annotations

import time
from pathlib import Path

from convert.convert import plan_checkpoint, write_checkpoint
from model.source import ModelSource
from pipeline.checkpoint import convert_checkpoint as pipeline_convert, plan_layout


def preflight_conversion(model_dir, *, tp=1, pp=1, quant=None, moe_tp=None, moe_ep=None,
                         pad_heads=False):
    """(the normalised HF config, the laid-out Shape without the vocabulary multiple)."""
    from dataclasses import replace

    model = ModelSource.open(model_dir)
    layout = plan_layout(model, tp=tp, pp=pp, quant=quant, moe_tp=moe_tp, moe_ep=moe_ep,
                         pad_heads=pad_heads)
    return model.config, replace(layout.shape, vocab_multiple=1)


def convert_checkpoint(model_dir, out_dir, *, tp=1, pp=1, dtype="auto", workers=1, force=False,
                       progress=True, quantization=None, quant=None, calibrated_model=None,
                       timings=None, ranks=None, moe_tp=None, moe_ep=None, pad_heads=False,
                       quant_report=None, calibration=None, digests=None) -> dict:
    model = ModelSource.open(model_dir)
    layout = plan_layout(model, tp=tp, pp=pp, quant=quant, moe_tp=moe_tp, moe_ep=moe_ep,
                         pad_heads=pad_heads)
    kw = dict(dtype=dtype, workers=workers, force=force, progress=progress, ranks=ranks)
    if calibrated_model is not None:
        done = _from_calibrated(model, Path(out_dir), layout, quant, calibrated_model, **kw)
    elif quant is None and quantization is not None:  # a raw block, no calibration
        cplan = plan_checkpoint(model, out_dir, layout.shape, tp=tp, pp=pp, dtype=dtype,
                                moe=layout.moe, moe_tp=moe_tp, moe_ep=moe_ep,
                                pad_heads=pad_heads, quantization=quantization, force=force)
        return write_checkpoint(cplan, ranks=ranks, workers=workers, force=force,
                                progress=progress, options=repr(None), digests=digests)
    else:
        done = pipeline_convert(model, out_dir, layout, quant, calibration=calibration,
                                digests=digests, **kw)
    if timings is not None:
        timings.update(done.timings)
    if quant_report is not None:
        quant_report.update(done.report)
    return done.config


def _from_calibrated(model, out_dir, layout, quant, cal, *, dtype, workers, force, progress,
                     ranks):
    """A model calibrated in memory (the whole-model reference paths): its tensors per rank."""
    from pipeline.calibration import modelopt_tensors, planned
    from pipeline.checkpoint import CheckpointResult, quantization_block
    from quantize.apply import stage_tensors
    from quantize.torch_io import TORCH_DTYPES

    shape = layout.shape
    cplan = plan_checkpoint(model, out_dir, shape, tp=layout.tp, pp=layout.pp, dtype=dtype,
                            moe=layout.moe, moe_tp=layout.moe_tp, moe_ep=layout.moe_ep,
                            pad_heads=layout.pad_heads,
                            quantization=quantization_block(quant, shape), force=force)
    torch_dtype = TORCH_DTYPES[cplan.config["dtype"]]
    report: dict = {}
    t0 = time.perf_counter()
    if quant.is_sq_plugin:
        rank_tensors = _sq_plugin_tensors(shape, quant, cplan.config, cal, report, torch_dtype)
    else:
        rank_tensors = modelopt_tensors(model.directory, shape, quant, cplan.config, cal,
                                        progress, torch_dtype)
    t1 = time.perf_counter()
    cplan.plans = planned(cplan, shape,
                          lambda tp_rank, layers: stage_tensors(rank_tensors(tp_rank), layers))
    timings = dict(calibration=t1 - t0, quantized_tensors=time.perf_counter() - t1)
    write_checkpoint(cplan, ranks=ranks, workers=workers, force=force, progress=progress,
                     calibrated=quant.name, options=repr(quant))
    return CheckpointResult(cplan.config, timings, report)


def _sq_plugin_tensors(shape, quant, config, cal, report, dtype):
    """TensorRT-LLM's plugin SmoothQuant from a whole-model ``PluginCalibration``
    (``quantize.sq_reference.calibrate_plugin``, the reference): pad, and return the per-rank
    tensor function."""
    from quantize.head_padding import pad_sq_plugin_layers
    from quantize.smoothquant import plugin_rank_tensors

    config["quantization"]["smoothquant_val"] = cal.smoothquant_val
    report.update(alphas=list(cal.alphas), **({"alpha_search": cal.search} if cal.search else {}))
    sq_layers = pad_sq_plugin_layers(cal.layers, shape.padding)  # calibrated on the real heads
    tp = config["mapping"]["tp_size"]
    return lambda tp_rank: plugin_rank_tensors(sq_layers, quant, num_heads=shape.tp_heads,
                                               num_kv_heads=shape.tp_kv_heads, tp=tp,
                                               rank=tp_rank, norm_dtype=dtype)


def interrupt_before_rank(monkeypatch, stop: int = 1):
    """TEST DOUBLE: Ctrl-C as the conversion starts rank ``stop`` (the ranks before it finished in
    checkpoint.partial/); returns the real rank writer, to put back for the rerun."""
    import convert.convert as cc

    real = cc._write_rank

    def stop_at(model_dir, plan, path, rank, progress, **kw):
        if rank == stop:
            raise KeyboardInterrupt
        return real(model_dir, plan, path, rank, progress, **kw)

    monkeypatch.setattr(cc, "_write_rank", stop_at)
    return real


def refused(capsys, argv, out: Path, *patterns) -> str:
    """Run the CLI; assert exit 2, one line on stderr matching every pattern, nothing written;
    return the line."""
    import re

    from builders.cli import main

    capsys.readouterr()
    rc = main([*argv, "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("build_engine: error: "), err
    for p in patterns:
        assert re.search(p, err[0]), (p, err[0])
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    return err[0]
