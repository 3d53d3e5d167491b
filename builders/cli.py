"""``build_engine``: HF model → TRT-LLM checkpoint → engines → Triton model repository.

Exit status: 0 done; 1 ``--verify`` found a mismatch; 2 bad input (one line on stderr);
3 the checkpoint (and Triton repository) were written but engines were not built here
(no TensorRT-LLM <= 1.2 or no GPU; the message gives the command to finish on a GPU host);
4 an engine build failed (its rank's log is shown); 130 interrupted (finished ranks kept for resume).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from common import interrupt
from common.digests import Digests
from common.errors import UserError

EXIT_MISMATCH, EXIT_USER, EXIT_NO_ENGINE, EXIT_INTERRUPTED = 1, 2, 3, 130


def main(argv=None) -> int:
    from builders.cli_args import build_parser

    args = build_parser().parse_args(argv)
    interrupt.install()
    try:
        return run(args)
    except UserError as e:
        print(f"build_engine: error: {e}", file=sys.stderr)
        return e.exit_code
    except interrupt.Interrupted as e:
        print(f"build_engine: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("build_engine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args) -> int:
    from builders.cli_args import defaults_from_other_flags
    from builders.manifest import write_manifest

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    defaults_from_other_flags(args)
    out = Path(args.output)
    timings: dict[str, float] = {}
    extra: dict = {}  # build.json "options" beyond the flags: the quantization recipe and its gate
    layout = None
    digests = Digests()  # the writers record the digests of what they write; build.json reads them
    if args.from_checkpoint:
        ckpt, model_dir, inputs = _from_checkpoint(args)
    else:
        if not args.model:
            raise UserError("--model is required: a local HF model dir or a bundled example name "
                            "(or --from-checkpoint CKPT_DIR)")
        from quantize.formats import QuantSpec

        quant = QuantSpec.from_args(args)  # bad combinations / calib file: before any work
        if args.smoothquant == "default":  # build.json records the alpha the recipe used
            args.smoothquant = quant.smoothquant_alpha
        if getattr(args, "target", "engine") == "pytorch":
            return _run_pytorch_target(args, out, quant, digests)
        converted = _convert(args, out, quant, timings, extra, digests)
        if isinstance(converted, int):  # a check failed
            return converted
        ckpt, model_dir, inputs, layout = converted
    if args.checkpoint_only:
        write_manifest(out, inputs=inputs, options={**vars(args), **extra}, stage_timings=timings,
                       layout=layout, digests=digests)
        return 0
    engines = _engines_and_triton(args, out, ckpt, model_dir, timings)
    write_manifest(out, inputs=inputs, options={**vars(args), **extra}, stage_timings=timings,
                   engines=_engine_record(engines), layout=layout, digests=digests)
    return engines.exit_code


def _from_checkpoint(args):
    """--from-checkpoint: engines (and Triton) from an existing checkpoint; the conversion flags
    that would have no effect are refused."""
    from builders.preflight import check_triton_args
    from quantize.formats import QuantSpec

    if args.model:
        raise UserError("give either --model or --from-checkpoint, not both")
    if args.pad_heads:  # a checkpoint's heads were laid out when it was converted
        raise UserError("--pad-heads applies when converting with --model; a --from-checkpoint "
                        "checkpoint keeps its own head layout (drop --pad-heads)")
    if QuantSpec.from_args(args).is_quantized:  # a checkpoint is quantized when converted
        raise UserError("quantization flags apply when converting with --model; a "
                        "--from-checkpoint checkpoint keeps its own quantization (drop them)")
    ckpt = Path(args.from_checkpoint)
    check_triton_args(args, None)
    return ckpt, None, {"checkpoint_dir": str(ckpt.resolve())}


def _convert(args, out: Path, quant, timings: dict, extra: dict, digests: Digests):
    """--model: every refusal first, then the checkpoint and its checks. Returns (checkpoint dir,
    model dir, build.json inputs, layout), or the exit status of a failed check."""
    from builders import checks, preflight
    from builders.manifest import InputHashing
    from convert.convert import convert_checkpoint
    from examples.registry import pads_heads_by_default, resolve_model

    model_dir = resolve_model(args.model)
    pad_heads = args.pad_heads or pads_heads_by_default(args.model)
    layout = preflight.head_padding(args, model_dir, quant, pad_heads)  # tp refusal first
    preflight.check_triton_args(args, model_dir)
    ranks = preflight.conversion_ranks(args, quant)
    tokenizer = preflight.quant_tokenizer(args, quant, model_dir)
    preflight.memory_plan(args, quant, model_dir, out, pad_heads)
    ppl_text = None
    if getattr(args, "eval_ppl", None):
        from verify.perplexity import read_text_file

        ppl_text = read_text_file(args.eval_ppl)  # bad file: one line, before any work
    inputs = InputHashing({"model": args.model, "model_dir": str(model_dir.resolve())})
    ckpt = out / "checkpoint"
    t0 = time.perf_counter()
    quant_timings: dict[str, float] = {}
    quant_report: dict = {}
    if quant.recipe:
        print(f"SmoothQuant recipe: {quant.recipe}")
    config = convert_checkpoint(model_dir, ckpt, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                workers=args.workers, force=args.force,
                                progress=not args.no_progress, quant=quant,
                                timings=quant_timings, ranks=ranks, moe_tp=args.moe_tp,
                                moe_ep=args.moe_ep, pad_heads=pad_heads,
                                quant_report=quant_report,
                                calibration=preflight.calibration_run(args, out, quant, tokenizer),
                                digests=digests)
    timings["checkpoint"] = time.perf_counter() - t0
    timings.update(quant_timings)  # included in "checkpoint"
    _print_calibration(args, quant, quant_timings, quant_report)
    ckpt = _print_checkpoint(args, out, ckpt, config, quant, timings)
    if quant.needs_calibration:
        own_store = None if args.calibration else out / "calibration"  # --calibration PATH is kept
        record = checks.gate_step(out, ckpt, model_dir, quant, tokenizer, timings, own_store)
        extra["quantization"] = {**record, **quant_report, "quality_gate": record["quality_gate"]}
    if args.verify and not checks.verify_step(ckpt, model_dir, quant, tokenizer, timings):
        return EXIT_MISMATCH
    if ppl_text is not None:
        checks.eval_ppl_step(ckpt, model_dir, ppl_text, timings)
    return ckpt, model_dir, inputs, layout


def _print_checkpoint(args, out: Path, ckpt: Path, config: dict, quant, timings: dict) -> Path:
    """Say what was written; with --ranks the checkpoint stays a .partial dir until its last rank."""
    m = config["mapping"]
    if not ckpt.is_dir():  # --ranks: other ranks are still to come
        ckpt = ckpt.with_name(ckpt.name + ".partial")
        print(f"checkpoint: rank(s) {args.ranks} of {m['world_size']} written into {ckpt}; "
              f"{out / 'checkpoint'} appears when the other ranks are written there too")
    print(f"checkpoint: {ckpt} ({m['world_size']} rank(s), tp {m['tp_size']}, "
          f"pp {m['pp_size']}, {config['dtype']}, {quant.name}) in "
          f"{timings['checkpoint']:.1f}s")
    return ckpt


def _print_calibration(args, quant, quant_timings: dict, quant_report: dict) -> None:
    if quant_report.get("alphas") and quant.sq_alpha_search:
        print(f"SmoothQuant alpha per layer (searched): {' '.join(f'{a:g}' for a in quant_report['alphas'])}")
    if not quant_timings:
        return
    if args.calibration is not None:
        how = f"reused {args.calibration}"
    else:
        hooks = quant.is_sq_plugin or quant.is_max_calibrated
        how = ("forward hooks" if hooks else "modelopt forward passes") + \
            ", layer by layer for dense models"
        how += f" over {quant.calib_size} x {quant.calib_seq_len} tokens"
    print(f"calibration: {quant_timings['calibration']:.1f}s ({how}), quantized tensors: "
          f"{quant_timings['quantized_tensors']:.1f}s")


def _engines_and_triton(args, out: Path, ckpt: Path, model_dir, timings: dict):
    """Build the engines (or say how to on a GPU host), then write the Triton repository when
    this run completes the world; return the engine stage's result."""
    from builders.engine import build_engines, options_from_args

    t0 = time.perf_counter()
    engine_options = options_from_args(args)
    # the Triton repository is written here even without engines; the GPU host then only builds
    # the engines (same options, so the same engine config.json the repository was filled from)
    hint_flags = () if args.triton_target == "none" else ("--triton-target", "none")
    engines = build_engines(ckpt, out / "engines", engine_options, force=args.force,
                            hint_flags=hint_flags, ranks=args.ranks)
    timings["engines"] = time.perf_counter() - t0
    stream = sys.stdout if engines.exit_code == 0 else sys.stderr
    print(f"engines: {engines.message}", file=stream)
    if engines.exit_code not in (0, EXIT_NO_ENGINE) or args.triton_target == "none":
        return engines
    # the Triton repository describes the whole world: written by the run that completes it
    whole = engines.complete if engines.exit_code == 0 else not ckpt.name.endswith(".partial")
    if not whole:
        print("triton: not written yet: the run that completes every rank writes it")
        return engines
    t0 = time.perf_counter()
    repo = _write_triton(args, out, ckpt, model_dir, engine_options,
                         engines_built=engines.exit_code == 0)
    timings["triton"] = time.perf_counter() - t0
    print(f"triton: {repo} ({args.triton_target} model repository, validated with "
          f"Triton's ModelConfig schema); launch: {repo / 'launch_triton.sh'}")
    return engines


def _engine_record(engines) -> dict:
    """build.json's account of the engines: which ranks this run built, on which GPU each rank
    of the output was built (all runs so far), and whether the world is complete."""
    return {"status": engines.status, "world_size": engines.world_size,
            "lengths": engines.lengths,  # max_seq_len as TensorRT-LLM deduces it, input clipped
            "complete": engines.complete, "tensorrt_llm": engines.trtllm_version,
            "ranks_built_here": [rb.rank for rb in engines.ranks if rb.status == "built"],
            "built_on": {str(r): rec for r, rec in sorted(engines.built_on.items())}}


def _run_pytorch_target(args, out: Path, spec, digests: Digests) -> int:
    """--target pytorch: DIR/hf_quantized (unified checkpoint) + DIR/triton (LLM-API repo)."""
    from builders import checks, preflight
    from builders.manifest import write_manifest
    from builders.pytorch_target import build_pytorch_target
    from examples.registry import pads_heads_by_default, resolve_model

    model_dir = resolve_model(args.model)
    inputs = {"model": args.model, "model_dir": str(model_dir.resolve())}
    preflight.refuse_engine_only_flags(args)
    preflight.refuse_padding_for_pytorch(args, model_dir,
                                         args.pad_heads or pads_heads_by_default(args.model))
    triton = args.triton_target != "none" and not args.checkpoint_only
    t0 = time.perf_counter()
    res = build_pytorch_target(model_dir, out, spec, tp=args.tp, pp=args.pp, triton_options=args,
                               triton=triton, force=args.force, progress=not args.no_progress,
                               digests=digests)
    timings = {"hf_quantized": time.perf_counter() - t0}
    print(f"hf_quantized: {res['checkpoint']} (modelopt unified checkpoint, {spec.name}) "
          f"in {timings['hf_quantized']:.1f}s")
    if spec.quant_algo == "W8A8_SQ_PER_CHANNEL":
        print("build_engine: note: --target pytorch writes SmoothQuant as modelopt's recipe "
              "(W8A8_SQ_PER_CHANNEL, the only one a unified checkpoint has), and TensorRT-LLM's PyTorch "
              "backend has no INT8 SmoothQuant method "
              "(tensorrt_llm/_torch/modules/linear.py get_quant_method; see README, Targets): this "
              "unified checkpoint is for other loaders of modelopt's format; for TensorRT-LLM use "
              "--fp8, --awq or --int8-weight-only, or --target engine", file=sys.stderr)
    extra: dict = {}
    tokenizer = None
    if spec.needs_calibration or (args.verify and spec.is_quantized):
        from quantize.calibrate import load_tokenizer

        tokenizer = (load_tokenizer(model_dir) if spec.needs_calibration else
                     load_tokenizer(model_dir, "--verify of a quantized checkpoint (on real text)",
                                    "; or drop --verify"))
    if spec.needs_calibration:  # the quality gate of a calibrated run, on the unified checkpoint
        extra["quantization"] = checks.gate_step(out, res["checkpoint"], model_dir, spec, tokenizer,
                                                 timings)
    if res["triton"] is not None:
        print(f"triton: {res['triton']} (LLM-API model repository for TensorRT-LLM's PyTorch "
              f"backend, validated); launch: {res['triton'] / 'launch_triton.sh'}")
    if args.verify and not checks.verify_step(res["checkpoint"], model_dir, spec, tokenizer, timings):
        return EXIT_MISMATCH
    write_manifest(out, inputs=inputs, options={**vars(args), **extra}, stage_timings=timings,
                   digests=digests)
    return 0


def _write_triton(args, out: Path, ckpt: Path, model_dir, engine_options, *, engines_built: bool):
    """DIR/triton for the engines: from the engines' own config.json when they were built here,
    else from the checkpoint config and the engine options (what trtllm-build will write)."""
    import json

    from builders.triton import (engine_config_from_checkpoint, validate_repo,
                                 write_engine_repo)

    if engines_built:
        engine_config = None
    else:
        ckpt_config = json.loads((ckpt / "config.json").read_text())
        engine_config = engine_config_from_checkpoint(ckpt_config, engine_options)
    repo = write_engine_repo(out / "triton", engine_dir=out / "engines",
                             tokenizer_dir=args.tokenizer_dir or model_dir,
                             engine_config=engine_config, options=args)
    validate_repo(repo)
    return repo
