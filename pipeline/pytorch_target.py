"""``--target pytorch``: open the model -> the unified checkpoint (calibrated whole for calibrated
formats) -> quality gate -> Triton (LLM-API repository) -> --verify."""
from __future__ import annotations

import sys
import time

from .plan import BuildPlan
from .result import EXIT_MISMATCH, BuildResult

SQ_NOTE = ("build_engine: note: --target pytorch writes SmoothQuant as modelopt's recipe "
           "(W8A8_SQ_PER_CHANNEL, the only one a unified checkpoint has), and TensorRT-LLM's PyTorch "
           "backend has no INT8 SmoothQuant method "
           "(tensorrt_llm/_torch/modules/linear.py get_quant_method; see README, Targets): this "
           "unified checkpoint is for other loaders of modelopt's format; for TensorRT-LLM use "
           "--fp8, --awq or --int8-weight-only, or --target engine")


def run_pytorch_target(plan: BuildPlan) -> BuildResult:
    """DIR/hf_quantized (unified checkpoint) + DIR/triton (LLM-API repo); ``plan`` is checked."""
    from builders import checks
    from builders.pytorch_target import write_pytorch_target

    model_dir, spec = plan.model.directory, plan.quant
    inputs = {"model": plan.options["model"], "model_dir": str(model_dir.resolve())}
    triton = plan.triton_target != "none"
    result = BuildResult(inputs=inputs)
    t0 = time.perf_counter()
    res = write_pytorch_target(model_dir, plan.out, spec, tp=plan.layout.tp, pp=plan.layout.pp,
                               triton_options=plan.triton_options, triton=triton,
                               force=plan.force, progress=plan.progress, digests=result.digests)
    timings = result.timings
    timings["hf_quantized"] = time.perf_counter() - t0
    print(f"hf_quantized: {res['checkpoint']} (modelopt unified checkpoint, {spec.name}) "
          f"in {timings['hf_quantized']:.1f}s")
    if spec.quant_algo == "W8A8_SQ_PER_CHANNEL":
        print(SQ_NOTE, file=sys.stderr)
    if spec.needs_calibration:  # the quality gate of a calibrated run, on the unified checkpoint
        result.extra["quantization"] = checks.gate_step(plan.out, res["checkpoint"], model_dir,
                                                        spec, plan.tokenizer, timings)
    if res["triton"] is not None:
        print(f"triton: {res['triton']} (LLM-API model repository for TensorRT-LLM's PyTorch "
              f"backend, validated); launch: {res['triton'] / 'launch_triton.sh'}")
    if plan.verify and not checks.verify_step(res["checkpoint"], model_dir, spec, plan.tokenizer,
                                              timings):
        return BuildResult(exit_code=EXIT_MISMATCH, manifest=False)
    return result
