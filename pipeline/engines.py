"""The engine and Triton steps of the engine target (builders.engine, builders.triton)."""
from __future__ import annotations

import json
import sys
import time

from .plan import BuildPlan
from .result import EXIT_NO_ENGINE


def engines_and_triton(plan: BuildPlan, ckpt, timings: dict, outputs: list | None = None):
    """Build the engines (or say how to on a GPU host), then write the Triton repository when
    this run completes the world; return the engine stage's result. ``outputs``: told the names
    under OUTPUT this run wrote. With --force, an ``engines/`` this run did not build goes (the
    tool's own only): the new repository and build.json never name engines nobody checked."""
    from builders.engine import build_engines
    from common.ownership import remove_owned

    outputs = [] if outputs is None else outputs

    t0 = time.perf_counter()
    # the Triton repository is written here even without engines; the GPU host then only builds
    # the engines (same options, so the same engine config.json the repository was filled from)
    hint_flags = () if plan.triton_target == "none" else ("--triton-target", "none")
    engines = build_engines(ckpt, plan.out / "engines", plan.engine_options, force=plan.force,
                            hint_flags=hint_flags, ranks=plan.ranks_text)
    timings["engines"] = time.perf_counter() - t0
    if engines.exit_code == 0:
        outputs.append("engines" if engines.complete else "engines.partial")
    elif plan.force:
        remove_owned(plan.out / "engines")  # older than this run's checkpoint or options
    stream = sys.stdout if engines.exit_code == 0 else sys.stderr
    print(f"engines: {engines.message}", file=stream)
    if engines.exit_code not in (0, EXIT_NO_ENGINE) or plan.triton_target == "none":
        return engines
    # the Triton repository describes the whole world: written by the run that completes it
    whole = engines.complete if engines.exit_code == 0 else not ckpt.name.endswith(".partial")
    if not whole:
        print("triton: not written yet: the run that completes every rank writes it")
        return engines
    t0 = time.perf_counter()
    repo = write_triton(plan, ckpt, engines_built=engines.exit_code == 0)
    outputs.append(repo.name)
    timings["triton"] = time.perf_counter() - t0
    print(f"triton: {repo} ({plan.triton_target} model repository, validated with "
          f"Triton's ModelConfig schema); launch: {repo / 'launch_triton.sh'}")
    return engines


def engine_record(engines) -> dict:
    """build.json's account of the engines: which ranks this run built, on which GPU each rank
    of the output was built (all runs so far), and whether the world is complete."""
    return {"status": engines.status, "world_size": engines.world_size,
            "lengths": engines.lengths,  # max_seq_len as TensorRT-LLM deduces it, input clipped
            "complete": engines.complete, "tensorrt_llm": engines.trtllm_version,
            "ranks_built_here": [rb.rank for rb in engines.ranks if rb.status == "built"],
            "built_on": {str(r): rec for r, rec in sorted(engines.built_on.items())}}


def write_triton(plan: BuildPlan, ckpt, *, engines_built: bool):
    """DIR/triton for the engines: from the engines' own config.json when they were built here,
    else from the checkpoint config and the engine options (what trtllm-build will write)."""
    from builders.triton import engine_config_from_checkpoint, validate_repo, write_engine_repo

    if engines_built:
        engine_config = None
    else:
        ckpt_config = json.loads((ckpt / "config.json").read_text())
        engine_config = engine_config_from_checkpoint(ckpt_config, plan.engine_options)
    model_dir = plan.model.directory if plan.model is not None else None
    repo = write_engine_repo(plan.out / "triton", engine_dir=plan.out / "engines",
                             tokenizer_dir=plan.tokenizer_dir or model_dir,
                             engine_config=engine_config, options=plan.triton_options,
                             lora_adapters=0 if plan.lora is None else len(plan.lora.adapters),
                             lora_dir=plan.out / "lora")
    validate_repo(repo)
    return repo
