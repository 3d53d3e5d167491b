"""``--target engine``: open the model -> calibrate if the format needs it -> quantized tensors per
rank -> write the checkpoint (staged) -> quality gate / --verify / --eval-ppl on the staged
checkpoint -> put it in place (the outputs built from an earlier one go) -> engines -> Triton.

Only a checkpoint that passed its checks is ever put in place: a run killed during them leaves
``checkpoint.partial`` (no ``checkpoint/``), which a rerun resumes or redoes."""
from __future__ import annotations

import time

from . import lora as lora_step
from .plan import BuildPlan
from .result import EXIT_MISMATCH, BuildResult


def run_engine_target(plan: BuildPlan) -> BuildResult:
    """The steps of the engine target; ``plan`` is checked (pipeline.plan.make_plan)."""
    if plan.from_checkpoint is not None:
        from builders.manifest import check_listed
        from common import ownership

        if ownership.entry(plan.from_checkpoint) is None:  # else its ownership record's digests
            check_listed(plan.from_checkpoint)  # were checked in the plan: build.json's here
        result = BuildResult(inputs={"checkpoint_dir": str(plan.from_checkpoint.resolve())})
        ckpt = plan.from_checkpoint
        loadable_step(ckpt, plan.ranks_text)
    else:
        from builders.manifest import InputHashing

        result = BuildResult(layout=plan.padding_layout, inputs=InputHashing(
            {"model": plan.options["model"], "model_dir": str(plan.model.directory.resolve())}))
        ckpt, done = checkpoint_step(plan, result)
        subset = ckpt.name.endswith(".partial") and not done.staged  # --ranks: some ranks only
        loadable_step(ckpt, plan.ranks_text if subset else None)
        lora = None if plan.lora is None else lora_step.convert_step(
            plan.lora, plan.model, plan.layout, plan.out, result.timings)
        if not _checks(plan, ckpt, done.report, result, lora):
            _discard_staged(plan, done, ckpt)
            return BuildResult(exit_code=EXIT_MISMATCH, manifest=False)
        ckpt = _put_in_place(plan, done, ckpt, result)
        if lora is not None:
            lora_step.put_in_place(lora)
            result.outputs.append(lora_step.LORA_DIR)
            result.extra["lora"] = plan.lora.record()
    if plan.checkpoint_only:
        return result
    from .engines import engines_and_triton, engine_record

    engines = engines_and_triton(plan, ckpt, result.timings, result.outputs)
    result.engines, result.exit_code = engine_record(engines), engines.exit_code
    return result


def _put_in_place(plan: BuildPlan, done, ckpt, result: BuildResult):
    """The checked checkpoint goes in place; the tool's outputs built from the one it replaces
    (engines, Triton repository, build.json) go with it, so nothing adopts them. Returns the
    checkpoint's directory (still ``.partial`` while --ranks leaves ranks to other runs)."""
    from .outputs import remove_stale

    if done.staged:
        done.put_in_place()
        remove_stale(plan.out)
        ckpt = plan.out / "checkpoint"
    result.outputs.append(ckpt.name)
    own = plan.calibration
    if own is not None and not own.reuse and not own.temporary and own.store.is_dir() and \
            own.store.parent.resolve() == plan.out.resolve():
        result.outputs.append(own.store.name)
    return ckpt


def _discard_staged(plan: BuildPlan, done, ckpt) -> None:
    """A --verify mismatch: the staged checkpoint is not put in place (an earlier output stays
    as it was); say where it is kept for a look."""
    import sys

    if done.staged:
        print(f"verify: the checkpoint was not put in place; it is kept in {ckpt} for a look "
              f"(a rerun of the same command redoes it)", file=sys.stderr)


def checkpoint_step(plan: BuildPlan, result: BuildResult):
    """Convert (calibrating first for a calibrated format), say what was written; (the checkpoint
    dir, ``.partial`` while --ranks leaves ranks to other runs; what calibration chose)."""
    from .checkpoint import convert_checkpoint

    quant = plan.quant
    t0 = time.perf_counter()
    if quant.recipe:
        print(f"SmoothQuant recipe: {quant.recipe}")
    done = convert_checkpoint(plan.model, plan.out / "checkpoint", plan.layout, quant,
                              dtype=plan.dtype, workers=plan.workers, force=plan.force,
                              progress=plan.progress, ranks=plan.ranks,
                              calibration=plan.calibration, digests=result.digests,
                              allow_nonfinite=plan.allow_nonfinite, promote_now=False)
    result.timings["checkpoint"] = time.perf_counter() - t0
    result.timings.update(done.timings)  # included in "checkpoint"
    _print_calibration(plan, done)
    return _print_checkpoint(plan, done, result.timings), done


def loadable_step(ckpt, ranks_text: str | None) -> None:
    """TensorRT-LLM's load rules on the checkpoint's headers (check/): a checkpoint it would not
    load stops here, one line and exit 1, before any engine (or gate / verify) time is spent."""
    from check import check_dir
    from check.findings import NotChecked
    from common.errors import UserError

    ranks = None
    if ranks_text is not None:
        from builders.engine_options import parse_ranks
        from check.declared import Layout
        from check.inspect import read_config

        ranks = parse_ranks(ranks_text, Layout.of(read_config(ckpt / "config.json") or {}).world)
    try:
        result = check_dir(ckpt, ranks)
    except NotChecked as e:  # a model class / format the table does not restate: build anyway
        print(f"check: skipped: {e}")
        return
    if result.exit_code:
        raise UserError(result.summary(), exit_code=result.exit_code)
    print(result.summary())


def _checks(plan: BuildPlan, ckpt, report: dict, result: BuildResult, lora=None) -> bool:
    """The quality gate of a calibrated run, --verify (with --lora: every adapter too, from
    ``lora``, the converted adapters' directory) and --eval-ppl; False on a --verify mismatch."""
    from builders import checks

    quant = plan.quant
    model_dir, timings = plan.model.directory, result.timings
    if quant.format.gated(quant):
        record = checks.gate_step(plan.out, ckpt, model_dir, quant, plan.tokenizer, timings,
                                  plan.own_calibration_store,
                                  allow_quality_loss=plan.allow_quality_loss)
        result.extra["quantization"] = {**record, **report,
                                        "quality_gate": record["quality_gate"]}
    elif quant.source_quant is not None:  # pre-quantized: converted as it is, nothing to gate
        result.extra["quantization"] = {"quant_algo": quant.quant_algo,
                                        "source": quant.source_quant.words}
    if plan.verify and not checks.verify_step(ckpt, model_dir, quant, plan.tokenizer, timings,
                                              shown=plan.out / "checkpoint"):
        return False
    if plan.verify and lora is not None and not checks.lora_verify_step(
            ckpt, model_dir, lora, plan.lora, quant, plan.tokenizer, timings,
            shown=plan.out / "checkpoint"):
        return False
    if plan.ppl_text is not None:
        checks.eval_ppl_step(ckpt, model_dir, plan.ppl_text, timings)
    return True


def _print_checkpoint(plan: BuildPlan, done, timings: dict):
    """Say what was written (staged for its checks; with --ranks the checkpoint stays a .partial
    dir until its last rank); the directory it is in."""
    config = done.config
    m = config["mapping"]
    ckpt = plan.out / "checkpoint"
    if done.staged:  # named where it goes once checked
        print(f"checkpoint: {ckpt} ({m['world_size']} rank(s), tp {m['tp_size']}, "
              f"pp {m['pp_size']}, {config['dtype']}, {plan.quant.name}) in "
              f"{timings['checkpoint']:.1f}s")
        return ckpt.with_name(ckpt.name + ".partial")
    if not ckpt.is_dir():  # --ranks: other ranks are still to come
        ckpt = ckpt.with_name(ckpt.name + ".partial")
        print(f"checkpoint: rank(s) {plan.ranks_text} of {m['world_size']} written into {ckpt}; "
              f"{plan.out / 'checkpoint'} appears when the other ranks are written there too")
    print(f"checkpoint: {ckpt} ({m['world_size']} rank(s), tp {m['tp_size']}, "
          f"pp {m['pp_size']}, {config['dtype']}, {plan.quant.name}) in "
          f"{timings['checkpoint']:.1f}s")
    return ckpt


def _print_calibration(plan: BuildPlan, done) -> None:
    quant, report, quant_timings = plan.quant, done.report, done.timings
    if report.get("alphas") and quant.sq_alpha_search:
        print(f"SmoothQuant alpha per layer (searched): {' '.join(f'{a:g}' for a in report['alphas'])}")
    if not quant_timings:
        return
    if plan.options.get("calibration") is not None:
        how = f"reused {plan.options['calibration']}"
    else:
        hooks = quant.format.memory.hooks  # SmoothQuant plugin, max-calibrated: no modelopt
        how = ("forward hooks" if hooks else "modelopt forward passes") + \
            ", layer by layer for dense models"
        how += f" over {quant.calib_size} x {quant.calib_seq_len} tokens"
    print(f"calibration: {quant_timings['calibration']:.1f}s ({how}), quantized tensors: "
          f"{quant_timings['quantized_tensors']:.1f}s")

