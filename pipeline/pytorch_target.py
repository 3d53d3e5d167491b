"""``--target pytorch``: open the model -> calibrate (layer by layer into the calibration store, as
the engine target, for the formats whose recipe writes its unified tensors from it; the whole model
in memory for the others) -> the unified checkpoint -> quality gate -> Triton (LLM-API
repository) -> --verify."""
from __future__ import annotations

import sys
import time

from .plan import BuildPlan
from .result import EXIT_MISMATCH, BuildResult


def run_pytorch_target(plan: BuildPlan) -> BuildResult:
    """DIR/hf_quantized (unified checkpoint) + DIR/triton (LLM-API repo); ``plan`` is checked."""
    from builders import checks
    from builders.pytorch_target import write_pytorch_target

    model_dir, spec = plan.model.directory, plan.quant
    inputs = {"model": plan.options["model"], "model_dir": str(model_dir.resolve())}
    triton = plan.triton_target != "none"
    t0 = time.perf_counter()
    result = BuildResult(inputs=inputs)
    calibration_timings: dict = {}
    try:
        res = write_pytorch_target(model_dir, plan.out, spec, tp=plan.layout.tp,
                                   pp=plan.layout.pp, triton_options=plan.triton_options,
                                   triton=triton, force=plan.force, progress=plan.progress,
                                   calibration=plan.calibration, timings=calibration_timings,
                                   digests=result.digests)
    finally:
        if plan.calibration is not None:
            plan.calibration.done()  # a temporary store goes
    timings = result.timings
    timings["hf_quantized"] = time.perf_counter() - t0
    result.outputs += [p.name for p in (res["checkpoint"], res["triton"]) if p is not None]
    _print_calibration(plan, calibration_timings)
    print(f"hf_quantized: {res['checkpoint']} (modelopt unified checkpoint, {spec.name}) "
          f"in {timings['hf_quantized']:.1f}s")
    note = spec.format.unified.note
    if note is not None:
        print(note, file=sys.stderr)
    if "calibration" in calibration_timings:  # the quality gate of a calibrated run, on the
        # unified checkpoint
        result.extra["quantization"] = checks.gate_step(plan.out, res["checkpoint"], model_dir,
                                                        spec, plan.tokenizer, timings,
                                                        plan.own_calibration_store,
                                                        allow_quality_loss=plan.allow_quality_loss)
    if res["triton"] is not None:
        print(f"triton: {res['triton']} (LLM-API model repository for TensorRT-LLM's PyTorch "
              f"backend, validated); launch: {res['triton'] / 'launch_triton.sh'}")
    if plan.verify and not checks.verify_step(res["checkpoint"], model_dir, spec, plan.tokenizer,
                                              timings):
        return BuildResult(exit_code=EXIT_MISMATCH, manifest=False)
    return result


def _print_calibration(plan: BuildPlan, timings: dict) -> None:
    """Where the unified tensors' calibration came from (layer-wise store runs only)."""
    if plan.calibration is None or "calibration" not in timings:
        return
    if plan.options.get("calibration") is not None:
        how = f"reused {plan.options['calibration']}"
    else:
        how = (f"layer by layer over {plan.quant.calib_size} x "
               f"{plan.quant.calib_seq_len} tokens")
    print(f"calibration: {timings['calibration']:.1f}s ({how})")
