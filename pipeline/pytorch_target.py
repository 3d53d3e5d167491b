"""``--target pytorch``: open the model -> calibrate (layer by layer into the calibration store, as
the engine target, for the formats whose recipe writes its unified tensors from it; the whole model
in memory for the others) -> the unified checkpoint, staged -> quality gate / --verify on the
staged checkpoint -> put it in place -> Triton (LLM-API repository).

As in the engine target, only a checkpoint that passed its checks is ever put in place: a run
that fails them, or is killed during them, leaves ``hf_quantized.partial`` (no new
``hf_quantized/``) and an earlier output as it was."""
from __future__ import annotations

import sys
import time

from .plan import BuildPlan
from .result import EXIT_MISMATCH, BuildResult


def run_pytorch_target(plan: BuildPlan) -> BuildResult:
    """DIR/hf_quantized (unified checkpoint) + DIR/triton (LLM-API repo); ``plan`` is checked."""
    from builders.pytorch_target import CHECKPOINT_DIR, put_in_place, stage_checkpoint, write_repo

    model_dir, spec = plan.model.directory, plan.quant
    inputs = {"model": plan.options["model"], "model_dir": str(model_dir.resolve())}
    triton = plan.triton_target != "none"
    t0 = time.perf_counter()
    result = BuildResult(inputs=inputs)
    calibration_timings: dict = {}
    try:
        staged, _ = stage_checkpoint(model_dir, plan.out, spec, force=plan.force,
                                     progress=plan.progress, calibration=plan.calibration,
                                     timings=calibration_timings, digests=result.digests,
                                     allow_nonfinite=plan.allow_nonfinite)
    finally:
        if plan.calibration is not None:
            plan.calibration.done()  # a temporary store goes
    timings = result.timings
    timings["hf_quantized"] = time.perf_counter() - t0
    _print_calibration(plan, calibration_timings)
    ckpt = plan.out / CHECKPOINT_DIR  # named where it goes once checked
    print(f"hf_quantized: {ckpt} (modelopt unified checkpoint, {spec.name}) "
          f"in {timings['hf_quantized']:.1f}s")
    note = spec.format.unified.note
    if note is not None:
        print(note, file=sys.stderr)
    if not _checks(plan, staged, "calibration" in calibration_timings, result):
        return BuildResult(exit_code=EXIT_MISMATCH, manifest=False)
    put_in_place(plan.out, result.digests, triton=triton)
    result.outputs.append(ckpt.name)
    if plan.lora is not None:
        from . import lora as lora_step

        lora_step.put_in_place(lora_step.copy_step(plan.lora, plan.out))
        result.outputs.append(lora_step.LORA_DIR)
        result.extra["lora"] = plan.lora.record()
    if triton:
        t0 = time.perf_counter()
        repo = write_repo(plan.out, tp=plan.layout.tp, pp=plan.layout.pp,
                          triton_options=plan.triton_options, force=plan.force)
        timings["triton"] = time.perf_counter() - t0
        result.outputs.append(repo.name)
        print(f"triton: {repo} (LLM-API model repository for TensorRT-LLM's PyTorch "
              f"backend, validated); launch: {repo / 'launch_triton.sh'}")
    return result


def _checks(plan: BuildPlan, staged, calibrated: bool, result: BuildResult) -> bool:
    """The quality gate of a calibrated run and --verify, on the staged checkpoint; False on a
    --verify mismatch (the stage is kept for a look). A gate breach removes the stage."""
    from builders import checks

    spec, model_dir, timings = plan.quant, plan.model.directory, result.timings
    shown = plan.out / staged.name.removesuffix(".partial")
    if calibrated:
        result.extra["quantization"] = checks.gate_step(
            plan.out, staged, model_dir, spec, plan.tokenizer, timings,
            plan.own_calibration_store,
            allow_quality_loss=plan.allow_quality_loss)
    if plan.verify and not checks.verify_step(staged, model_dir, spec, plan.tokenizer, timings,
                                              shown=shown):
        print(f"verify: the checkpoint was not put in place; it is kept in {staged} for a look "
              f"(a rerun of the same command redoes it)", file=sys.stderr)
        return False
    return True


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
