"""``BuildPlan``: what one ``build_engine`` run does, made once from the parsed arguments by
``make_plan``. Every refusal happens while it is made (one line, exit 2, before any work and before
anything is written); the stages below take the plan's typed fields, never the Namespace."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

from . import preflight

#: engine flags the LLM-API repository passes to LLM(...) (builders.triton.llmapi)
LLM_SIZE_FLAGS = ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width")


@dataclass(frozen=True)
class BuildPlan:
    """``target``: "engine" or "pytorch"; ``model``: the ModelSource (None with --from-checkpoint,
    whose directory is ``from_checkpoint``); ``layout``: the checkpoint's split (engine target
    from --model); ``ranks``: the conversion ranks of this run (None = all) and ``ranks_text`` the
    --ranks flag for the engine stage; ``options``: build.json's "options" (the flags as
    resolved); ``engine_options`` / ``triton_options``: the engine and Triton stages' option
    objects (None where the run has no such stage)."""

    target: str
    out: Path
    options: dict
    model: object = None
    from_checkpoint: Path | None = None
    quant: object = None
    layout: object = None
    dtype: str = "auto"
    workers: int = 1
    force: bool = False
    allow_nonfinite: bool = False
    allow_quality_loss: bool = False
    progress: bool = True
    ranks: list | None = None
    ranks_text: str | None = None
    tokenizer: object = None
    calibration: object = None
    own_calibration_store: Path | None = None
    verify: bool = False
    ppl_text: str | None = None
    checkpoint_only: bool = False
    triton_target: str = "none"
    tokenizer_dir: str | None = None
    engine_options: object = None
    triton_options: object = None
    padding_layout: dict | None = None
    #: the capability table's warnings / note (pipeline.preflight.gpu_capability), printed once
    #: every refusal has passed
    gpu_notes: tuple = ()
    lora: object = None  # pipeline.lora.LoraPlan (--lora)


def make_plan(args) -> BuildPlan:
    """The run's plan from the parsed arguments; every refusal first (see the module docstring)."""
    from builders.cli_args import defaults_from_other_flags

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    defaults_from_other_flags(args)
    if args.from_checkpoint:
        return _noted(_checked(_from_checkpoint_plan(args), args))
    if not args.model:
        raise UserError("--model is required: a local HF model dir or a bundled example name "
                        "(or --from-checkpoint CKPT_DIR)")
    from quantize.formats import QuantSpec

    quant = QuantSpec.from_args(args)  # bad combinations / calib file: before any work
    if args.smoothquant == "default":  # build.json records the alpha the recipe used
        args.smoothquant = quant.smoothquant_alpha
    if getattr(args, "target", "engine") == "pytorch":
        return _noted(_checked(_pytorch_plan(args, quant), args))
    return _noted(_checked(_engine_plan(args, quant), args))


def _noted(plan: BuildPlan) -> BuildPlan:
    """Print the capability table's warnings (stderr) / its "gpu:" line (stdout, with the plan's
    other lines) once every refusal has passed."""
    for note in plan.gpu_notes:
        print(note, file=sys.stdout if note.startswith("gpu:") else sys.stderr)
    return plan


def _checked(plan: BuildPlan, args) -> BuildPlan:
    """The output refusals (pipeline.outputs): what the run replaces or deletes in OUTPUT is
    the tool's own, an existing output has --force, no input lies under it."""
    from . import outputs

    model_dir = plan.model.directory if plan.model is not None else None
    outputs.check(plan, {"--model": model_dir, "--from-checkpoint": plan.from_checkpoint,
                         "--calibration": getattr(args, "calibration", None),
                         "--tokenizer-dir": plan.tokenizer_dir,
                         "--calib-data": getattr(args, "calib_data", None),
                         "--eval-ppl": getattr(args, "eval_ppl", None)})
    return plan


def _common(args) -> dict:
    """The plan fields every target takes from the flags alike."""
    return dict(out=Path(args.output), dtype=args.dtype, workers=args.workers, force=args.force,
                allow_nonfinite=getattr(args, "allow_nonfinite", False),
                allow_quality_loss=getattr(args, "allow_quality_loss", False),
                progress=not args.no_progress, verify=args.verify,
                checkpoint_only=args.checkpoint_only, triton_target=args.triton_target,
                tokenizer_dir=args.tokenizer_dir, ranks_text=args.ranks)


def _stage_options(args, quant_algo=None) -> dict:
    """The engine and Triton stages' options, converted here (their range refusals included,
    whether or not this run has those stages; ``quant_algo``: the checkpoint's, for the engine
    options that need a format)."""
    from builders.engine import check_options_against_checkpoint
    from builders.engine_options import options_from_args
    from builders.triton import TritonOptions

    engine = options_from_args(args)
    if args.checkpoint_only:
        return {}
    check_options_against_checkpoint(engine, {"quantization": {"quant_algo": quant_algo}})
    triton = None if args.triton_target == "none" else TritonOptions.from_any(args)
    return dict(engine_options=engine, triton_options=triton)


def _refuse_unfinished(ckpt: Path) -> None:
    """A checkpoint build_engine has not finished (its stage, killed before or during its checks)
    or one changed since it was put in place (names and sizes, then every file's BLAKE3 against
    the ownership record) is refused; one the tool did not write (another converter's) is taken
    as it is."""
    from common import ownership

    got = ownership.entry(ckpt)
    if got is not None and got.get("stage") or ckpt.name.endswith(".partial") or \
            (ckpt / "fingerprint.json").is_file():
        raise UserError(f"--from-checkpoint {ckpt} is an unfinished checkpoint (build_engine's "
                        f"staging directory: its writing or its checks did not finish); rerun "
                        f"the build that writes it, then use its checkpoint/")
    if got is not None:
        why = ownership.foreign(ckpt) or ownership.damaged(ckpt)
        if why is not None:
            raise UserError(f"--from-checkpoint: {why}; rerun the build that wrote it")


def _checkpoint_config(ckpt) -> dict:
    """--from-checkpoint's config.json, for the refusals that need it (vocabulary, format); one
    line, before any work, when it is not a TensorRT-LLM checkpoint config."""
    from builders.engine import read_checkpoint_layout

    return read_checkpoint_layout(Path(ckpt), ranks=[])[0]


def _from_checkpoint_plan(args) -> BuildPlan:
    """--from-checkpoint: engines (and Triton) from an existing checkpoint; the conversion flags
    that would have no effect are refused."""
    from quantize.formats import QuantSpec

    if args.model:
        raise UserError("give either --model or --from-checkpoint, not both")
    if args.pad_heads:  # a checkpoint's heads were laid out when it was converted
        raise UserError("--pad-heads applies when converting with --model; a --from-checkpoint "
                        "checkpoint keeps its own head layout (drop --pad-heads)")
    quant = QuantSpec.from_args(args)
    if quant.format.quantized(quant):  # a checkpoint is quantized when converted
        raise UserError("quantization flags apply when converting with --model; a "
                        "--from-checkpoint checkpoint keeps its own quantization (drop them)")
    if getattr(args, "lora", None):
        raise UserError("--lora needs --model (each adapter is checked against the HF model and "
                        "laid out as its checkpoint); for an existing output: build_engine lora "
                        "OUTPUT --lora DIR ...")
    _refuse_unfinished(Path(args.from_checkpoint))
    config = _checkpoint_config(args.from_checkpoint)
    gpu_notes = tuple(preflight.checkpoint_gpu_capability(args, config))
    preflight.check_triton_args(args, None, config.get("vocab_size"))
    stages = _stage_options(args, (config.get("quantization") or {}).get("quant_algo"))
    from .lora import from_checkpoint_options

    lora_options = from_checkpoint_options(args, stages.get("engine_options"), config)
    if lora_options is not None:
        stages["engine_options"] = lora_options
    return BuildPlan(target="engine", options=dict(vars(args)), gpu_notes=gpu_notes,
                     from_checkpoint=Path(args.from_checkpoint), **_common(args), **stages)


def _reads_float(args) -> tuple[str, ...]:
    """The flags given that read --model as float weights (the HF reference model)."""
    return tuple(f for f, on in (("--verify", args.verify),
                                 ("--eval-ppl", getattr(args, "eval_ppl", None))) if on)


def _engine_plan(args, quant) -> BuildPlan:
    """--model, --target engine: the layout, Triton, ranks, tokenizer, memory and calibration
    refusals, in the order a user meets them."""
    from model.source import ModelSource

    from .checkpoint import plan_layout

    model = ModelSource.open(args.model)
    quant = preflight.source_quantization(quant, model, reads_float=_reads_float(args))
    preflight.family_formats(quant, model, "engine")
    gpu_notes = tuple(preflight.gpu_capability(args, quant, model, "engine"))
    layout = plan_layout(model, tp=args.tp, pp=args.pp, quant=quant, moe_tp=args.moe_tp,
                         moe_ep=args.moe_ep, pad_heads=args.pad_heads or model.pads_heads)
    from .lora import engine_options, plan_lora

    lora = plan_lora(args, model, layout, quant)
    padding_layout = {**(preflight.head_padding(args, layout.shape) or {}),
                      **(preflight.hidden_padding(args, layout.shape, quant) or {})} or None
    preflight.check_triton_args(args, model.directory, model.shape.vocab)
    ranks = preflight.conversion_ranks(args, quant)
    tokenizer = preflight.quant_tokenizer(args, quant, model)
    preflight.memory_plan(args, quant, layout.shape, Path(args.output))
    ppl_text = None
    if getattr(args, "eval_ppl", None):
        from verify.perplexity import read_text_file

        ppl_text = read_text_file(args.eval_ppl)  # bad file: one line, before any work
    calibration = preflight.calibration_run(args, Path(args.output), quant, tokenizer)
    if calibration is not None:
        from .calibration import calibration_run

        calibration = calibration_run(calibration, quant, layout.shape, Path(args.output))
    own_store = None if args.calibration else Path(args.output) / "calibration"
    stages = _stage_options(args, quant.quant_algo if quant.format.quantized(quant) else None)
    if "engine_options" in stages:
        stages["engine_options"] = engine_options(stages["engine_options"], lora)
    return BuildPlan(target="engine", options=dict(vars(args)), model=model, quant=quant,
                     layout=layout, ranks=ranks, tokenizer=tokenizer, calibration=calibration,
                     own_calibration_store=own_store, ppl_text=ppl_text,
                     padding_layout=padding_layout, gpu_notes=gpu_notes, lora=lora,
                     **_common(args), **stages)


def _pytorch_plan(args, quant) -> BuildPlan:
    """--target pytorch: the engine-only flags, head padding and the unified checkpoint's own
    refusals (format, tp/pp, experts, existing outputs, Triton options and tokenizer)."""
    from builders.pytorch_target import preflight as pytorch_preflight
    from builders.triton import TritonOptions
    from model.source import ModelSource

    from builders.engine_options import options_from_args

    model = ModelSource.open(args.model)
    # from a calibration store; a mixture of experts calibrates whole (as on the engine target)
    layerwise = quant.format.unified_layerwise(quant) and not model.shape.experts
    preflight.refuse_engine_only_flags(args, reuses_calibration=layerwise)
    options_from_args(args)  # the LLM(...) size limits among them: their ranges, always
    quant = preflight.source_quantization(quant, model, "pytorch", _reads_float(args))
    preflight.family_formats(quant, model, "pytorch")
    gpu_notes = tuple(preflight.gpu_capability(args, quant, model, "pytorch"))
    from .lora import llm_api_lora_config, plan_lora

    lora = plan_lora(args, model, None, quant)  # PEFT directories for the LLM API
    preflight.refuse_padding_for_pytorch(args, model, args.pad_heads or model.pads_heads)
    triton = args.triton_target != "none" and not args.checkpoint_only
    pytorch_preflight(model, Path(args.output), quant, tp=args.tp, pp=args.pp,
                      triton_options=args if triton else None, triton=triton, force=args.force)
    tokenizer = None
    if quant.format.calibration(quant) is not None:
        tokenizer = model.tokenizer()
        preflight.calibration_text(quant, tokenizer)
    elif args.verify and quant.format.quantized(quant):
        tokenizer = model.tokenizer("--verify of a quantized checkpoint (on real text)",
                                    "; or drop --verify")
    calibration = None
    if layerwise:  # --calibration's store (either target's), or a temporary one of this run
        calibration = preflight.calibration_run(args, Path(args.output), quant, tokenizer)
        if not args.calibration:
            calibration.store = Path(args.output) / "hf_quantized.calibration"
            calibration.temporary = True
    _pytorch_memory_plan(args, quant, model, layerwise)
    options = None
    if triton:  # the Triton options and the LLM(...) size limits the engine flags give
        options = TritonOptions.from_any(args).as_dict()
        options.update({k: getattr(args, k) for k in LLM_SIZE_FLAGS})
        if lora is not None:
            options["lora_config"] = llm_api_lora_config(lora, Path(args.output))
    return BuildPlan(target="pytorch", options=dict(vars(args)), model=model, quant=quant,
                     layout=_Split(args.tp, args.pp), tokenizer=tokenizer, triton_options=options,
                     calibration=calibration, gpu_notes=gpu_notes, lora=lora,
                     **{**_common(args), "triton_target": args.triton_target if triton else "none"})


def _pytorch_memory_plan(args, quant, model, layerwise: bool) -> None:
    """The memory plan of the unified checkpoint (one writer, the source's dtype), printed and
    checked as the engine target's: layer by layer from the calibration store, or the whole
    model calibrated in memory."""
    from quantize import memory

    device = preflight.calibration_device(args, quant)
    dtype = str(model.raw.get("torch_dtype") or model.raw.get("dtype") or "")
    stages = memory.plan(model.shape, quant, tp=1, pp=1, device=device,
                         out_dtype_bytes=4 if dtype == "float32" else 2, layerwise=layerwise,
                         checks=memory.checks(args.verify, None), unified=True)
    if args.calibration is not None:
        stages = [s for s in stages if s.name != "calibration"]
    print(f"memory plan: {memory.describe(stages)}")
    memory.check(stages, Path(args.output), device)


@dataclass(frozen=True)
class _Split:
    """The PyTorch target's tp x pp (the backend splits the HF checkpoint itself)."""

    tp: int
    pp: int
