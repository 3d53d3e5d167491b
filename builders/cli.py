"""``build_engine``: HF model → TRT-LLM checkpoint → engines → Triton model repository.

Exit status: 0 done; 1 ``--verify`` found a mismatch; 2 bad input (one line on stderr);
3 the checkpoint (and Triton repository) were written but engines were not built here
(no TensorRT-LLM <= 1.2 or no GPU; the message gives the command to finish on a GPU host);
4 an engine build failed (its rank's log is shown); 130 interrupted (finished ranks kept for resume).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from convert import interrupt
from convert.errors import UserError

EXIT_MISMATCH, EXIT_USER, EXIT_NO_ENGINE, EXIT_INTERRUPTED = 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_engine",
        description="Convert a Hugging Face Llama/Mistral/Qwen2/Mixtral model into a sharded (optionally "
                    "quantized) TensorRT-LLM checkpoint, engines and a Triton model repository.")
    g = p.add_argument_group("model and layout")
    g.add_argument("--from-checkpoint", type=Path, metavar="CKPT_DIR",
                   help="skip conversion: build engines (and the Triton repository) from an "
                        "existing TRT-LLM checkpoint dir, e.g. on a GPU host")
    g.add_argument("--model", help="local HF model dir, or a bundled example name: smollm2 "
                                   "(the real SmolLM2-135M-Instruct: 9 heads, 3 KV heads; tp 1, 3), "
                                   "llama (the same model with --pad-heads implied: tp 2 and 4 pad "
                                   "it exactly to 12 heads / 4 KV heads), tiny-llama, tiny-mistral, "
                                   "tiny-qwen2 (tiny random models)")
    g.add_argument("--output", required=True, type=Path, help="output directory")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    g.add_argument("--moe-tp", type=int, metavar="N",
                   help="mixture of experts (Mixtral): split every expert's intermediate "
                        "dimension N ways (TensorRT-LLM's moe_tp_size; default: tp, or tp / "
                        "--moe-ep); --moe-tp x --moe-ep must equal --tp")
    g.add_argument("--moe-ep", type=int, metavar="N",
                   help="mixture of experts: expert parallelism, each rank holding experts / N "
                        "whole experts (moe_ep_size; default: 1, or tp / --moe-tp)")
    g.add_argument("--pad-heads", action="store_true",
                   help="when --tp does not divide the attention heads, add zero heads (whole KV "
                        "groups) to the smallest count it does: exact (same logits), at the cost "
                        "of more attention compute and KV cache (printed, and in build.json); a "
                        "no-op when tp divides the heads. Engine target only")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weight dtype (auto: the model's fp16/bf16, float16 for fp32 models)")
    g.add_argument("--workers", type=int, default=1,
                   help="ranks converted in parallel (processes), and engines built in parallel "
                        "(one GPU each) unless --build-workers says otherwise (default 1)")
    g.add_argument("--ranks", metavar="A-B",
                   help="convert and/or build only ranks A to B (or one rank R) of the world, "
                        "e.g. the ranks of one node of a multi-node build; the checkpoint config "
                        "and the Triton repository still describe the whole world, and each "
                        "output appears (renamed from its .partial dir) when its last rank lands "
                        "(default: all ranks)")
    g.add_argument("--force", action="store_true", help="replace existing outputs")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("stages")
    s.add_argument("--target", choices=["engine", "pytorch"], default="engine",
                   help="engine (default): TRT-LLM checkpoint + engines (TensorRT-LLM <= 1.2.x); "
                        "pytorch: modelopt unified HF checkpoint in DIR/hf_quantized + LLM-API "
                        "Triton repository, for TensorRT-LLM's PyTorch backend")
    s.add_argument("--checkpoint-only", action="store_true",
                   help="stop after writing DIR/checkpoint")
    s.add_argument("--verify", action="store_true",
                   help="after conversion, run the checkpoint on CPU with TensorRT-LLM's "
                        "semantics and compare its logits with the HF model")
    s.add_argument("--eval-ppl", metavar="FILE",
                   help="after conversion, print the perplexity of the checkpoint (CPU reference "
                        "reader) and of the HF model on this text file (first 4096 tokens, "
                        "windows of 256)")
    from builders.engine import add_engine_arguments
    from builders.triton import add_triton_arguments

    from quantize.formats import add_quant_arguments

    add_quant_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(build_workers=None)  # None: follow --workers (trtllm-build's --workers)
    add_triton_arguments(p)
    return p


def main(argv=None) -> int:
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
    from builders.manifest import InputHashing, write_manifest
    from convert.convert import convert_checkpoint
    from examples.registry import pads_heads_by_default, resolve_model
    from quantize.formats import QuantSpec

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    _defaults_from_other_flags(args)
    out = Path(args.output)
    timings: dict[str, float] = {}
    inputs: dict = {}
    layout = None
    extra: dict = {}  # build.json "options" beyond the flags: the quantization recipe and its gate
    if args.from_checkpoint:
        if args.model:
            raise UserError("give either --model or --from-checkpoint, not both")
        if args.pad_heads:  # a checkpoint's heads were laid out when it was converted
            raise UserError("--pad-heads applies when converting with --model; a --from-checkpoint "
                            "checkpoint keeps its own head layout (drop --pad-heads)")
        if QuantSpec.from_args(args).is_quantized:  # a checkpoint is quantized when converted
            raise UserError("quantization flags apply when converting with --model; a "
                            "--from-checkpoint checkpoint keeps its own quantization (drop them)")
        ckpt = Path(args.from_checkpoint)
        inputs["checkpoint_dir"] = str(ckpt.resolve())
        model_dir = None
        _check_triton_args(args, model_dir)
    else:
        if not args.model:
            raise UserError("--model is required: a local HF model dir or a bundled example name "
                            "(or --from-checkpoint CKPT_DIR)")
        quant = QuantSpec.from_args(args)  # bad combinations / calib file: before any work
        if args.smoothquant == "default":  # build.json records the alpha the recipe used
            args.smoothquant = quant.smoothquant_alpha
        model_dir = resolve_model(args.model)
        inputs.update(model=args.model, model_dir=str(model_dir.resolve()))
        pad_heads = args.pad_heads or pads_heads_by_default(args.model)
        if getattr(args, "target", "engine") == "pytorch":
            _refuse_engine_only_flags(args)
            _refuse_padding_for_pytorch(args, model_dir, pad_heads)
            return _run_pytorch_target(args, model_dir, out, inputs)
        layout = _head_padding(args, model_dir, quant, pad_heads)  # tp refusal: before any work
        _check_triton_args(args, model_dir)
        ranks = _conversion_ranks(args, quant)
        tokenizer = _quant_tokenizer(args, quant, model_dir)  # before any work
        _memory_plan(args, quant, model_dir, out, pad_heads)  # refuses before any work
        inputs = InputHashing(inputs)  # build.json's shard hashes, while converting
        ckpt = out / "checkpoint"
        ppl_text = None
        if getattr(args, "eval_ppl", None):
            from verify.perplexity import read_text_file

            ppl_text = read_text_file(args.eval_ppl)  # bad file: one line, before any work
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
                                    calibration=_calibration_run(args, out, quant, tokenizer))
        timings["checkpoint"] = time.perf_counter() - t0
        timings.update(quant_timings)  # included in "checkpoint"
        _print_calibration(args, quant, quant_timings, quant_report)
        m = config["mapping"]
        if not ckpt.is_dir():  # --ranks: other ranks are still to come
            ckpt = ckpt.with_name(ckpt.name + ".partial")
            print(f"checkpoint: rank(s) {args.ranks} of {m['world_size']} written into {ckpt}; "
                  f"{out / 'checkpoint'} appears when the other ranks are written there too")
        print(f"checkpoint: {ckpt} ({m['world_size']} rank(s), tp {m['tp_size']}, "
              f"pp {m['pp_size']}, {config['dtype']}, {quant.name}) in "
              f"{timings['checkpoint']:.1f}s")
        if quant.needs_calibration:
            t0 = time.perf_counter()
            gate = _quality_gate(ckpt, model_dir, quant, tokenizer)
            timings["quality_gate"] = time.perf_counter() - t0
            extra["quantization"] = {"quant_algo": quant.quant_algo, "recipe": quant.recipe or quant.name,
                                     **quant_report, "quality_gate": gate}
            if not gate["passed"]:
                # this run's own calibration store goes too (a --calibration PATH is kept)
                _discard(out, ckpt, None if args.calibration else out / "calibration")
                print(f"build_engine: error: the quality gate failed: perplexity +{gate['increase_pct']:.2f}% over "
                      f"the float model > --max-ppl-increase {quant.max_ppl_increase:g}%; nothing was kept "
                      f"(try another recipe or alpha, e.g. --smoothquant auto, or more --calib-size)",
                      file=sys.stderr)
                return EXIT_MISMATCH
        if args.verify:
            from verify.reference import summary_line

            t0 = time.perf_counter()
            report, passed = _verify(ckpt, model_dir, quant, tokenizer)
            timings["verify"] = time.perf_counter() - t0
            print(f"verify: {summary_line(report, ckpt)}")
            if not passed:
                return EXIT_MISMATCH
        if ppl_text is not None:
            from verify.perplexity import checkpoint_ppl, hf_ppl, ppl_line

            t0 = time.perf_counter()
            print(ppl_line("checkpoint", checkpoint_ppl(ckpt, ppl_text, hf_dir=model_dir)))
            print(ppl_line("Hugging Face model", hf_ppl(model_dir, ppl_text)))
            timings["eval_ppl"] = time.perf_counter() - t0
    if args.checkpoint_only:
        write_manifest(out, inputs=inputs, options={**vars(args), **extra}, stage_timings=timings,
                       layout=layout)
        return 0
    engines = _engines_and_triton(args, out, ckpt, model_dir, timings)
    write_manifest(out, inputs=inputs, options={**vars(args), **extra}, stage_timings=timings,
                   engines=_engine_record(engines), layout=layout)
    return engines.exit_code


def _refuse_engine_only_flags(args) -> None:
    """--target pytorch: the flags that only shape a TensorRT-LLM checkpoint, refused in one line."""
    if args.ranks is not None:
        raise UserError("--ranks splits a TensorRT-LLM checkpoint and its engines over "
                        "runs (--target engine); the PyTorch target's unified "
                        "checkpoint is written whole: drop --ranks")
    if args.calibration is not None:
        raise UserError("--calibration is reused by TensorRT-LLM checkpoints (--target "
                        "engine); the PyTorch target calibrates its unified checkpoint "
                        "itself: drop --calibration")
    if args.moe_tp is not None or args.moe_ep is not None:
        raise UserError("--moe-tp/--moe-ep split a TRT-LLM checkpoint (--target engine); "
                        "the PyTorch backend takes moe_tensor_parallel_size / "
                        "moe_expert_parallel_size when it loads the model: drop them")


def _print_calibration(args, quant, quant_timings: dict, quant_report: dict) -> None:
    if quant_report.get("alphas") and quant.sq_alpha_search:
        print(f"SmoothQuant alpha per layer (searched): {' '.join(f'{a:g}' for a in quant_report['alphas'])}")
    if not quant_timings:
        return
    if args.calibration is not None:
        how = f"reused {args.calibration}"
    else:
        how = ("forward hooks" if quant.is_sq_plugin else "modelopt forward passes") + \
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


def _conversion_ranks(args, quant):
    """--ranks for the conversion (checked against tp x pp before any work); None = all. A
    check of the whole checkpoint (--verify, --eval-ppl) needs every rank in this run, and the
    ranks of a calibrated format come from one calibration."""
    if args.ranks is None:
        return None
    from builders.engine_options import parse_ranks

    ranks = parse_ranks(args.ranks, args.tp * args.pp)
    if len(ranks) == args.tp * args.pp:
        return ranks
    if args.verify or getattr(args, "eval_ppl", None):
        raise UserError("--verify and --eval-ppl run the whole checkpoint: drop them with "
                        "--ranks, or run them where every rank is converted")
    if quant.needs_calibration:
        raise UserError(f"--ranks cannot split a calibrated format ({quant.name}) over runs: "
                        "the ranks of two calibrations must not be mixed; convert every rank in "
                        "one run (CPU only) and use --ranks with --from-checkpoint for engines")
    return ranks


def _engine_record(engines) -> dict:
    """build.json's account of the engines: which ranks this run built, on which GPU each rank
    of the output was built (all runs so far), and whether the world is complete."""
    return {"status": engines.status, "world_size": engines.world_size,
            "lengths": engines.lengths,  # max_seq_len as TensorRT-LLM deduces it, input clipped
            "complete": engines.complete, "tensorrt_llm": engines.trtllm_version,
            "ranks_built_here": [rb.rank for rb in engines.ranks if rb.status == "built"],
            "built_on": {str(r): rec for r, rec in sorted(engines.built_on.items())}}


def _run_pytorch_target(args, model_dir, out: Path, inputs: dict) -> int:
    """--target pytorch: DIR/hf_quantized (unified checkpoint) + DIR/triton (LLM-API repo)."""
    from builders.manifest import write_manifest
    from builders.pytorch_target import build_pytorch_target
    from quantize.formats import QuantSpec

    spec = QuantSpec.from_args(args)
    triton = args.triton_target != "none" and not args.checkpoint_only
    t0 = time.perf_counter()
    res = build_pytorch_target(model_dir, out, spec, tp=args.tp, pp=args.pp, triton_options=args,
                               triton=triton, force=args.force, progress=not args.no_progress)
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
    if spec.needs_calibration:  # the quality gate of a calibrated run, on the unified checkpoint
        from quantize.calibrate import load_tokenizer

        t0 = time.perf_counter()
        gate = _quality_gate(res["checkpoint"], model_dir, spec, load_tokenizer(model_dir))
        timings["quality_gate"] = time.perf_counter() - t0
        extra["quantization"] = {"quant_algo": spec.quant_algo, "recipe": spec.recipe or spec.name,
                                 "quality_gate": gate}
        if not gate["passed"]:
            _discard(out, res["checkpoint"])
            print(f"build_engine: error: the quality gate failed: perplexity +{gate['increase_pct']:.2f}% over "
                  f"the float model > --max-ppl-increase {spec.max_ppl_increase:g}%; nothing was kept",
                  file=sys.stderr)
            return EXIT_MISMATCH
    if res["triton"] is not None:
        print(f"triton: {res['triton']} (LLM-API model repository for TensorRT-LLM's PyTorch "
              f"backend, validated); launch: {res['triton'] / 'launch_triton.sh'}")
    if args.verify:
        from verify.reference import summary_line

        tokenizer = None
        if spec.is_quantized:
            from quantize.calibrate import load_tokenizer

            tokenizer = load_tokenizer(model_dir, "--verify of a quantized checkpoint (on real text)",
                                       "; or drop --verify")
        report, passed = _verify(res["checkpoint"], model_dir, spec, tokenizer)
        print(f"verify: {summary_line(report, res['checkpoint'])}")
        if not passed:
            return EXIT_MISMATCH
    write_manifest(out, inputs=inputs, options={**vars(args), **extra}, stage_timings=timings)
    return 0


def _memory_plan(args, quant, model_dir, out: Path, pad_heads: bool) -> None:
    """Print the expected peak host RAM / device memory / disk per stage; refuse (one line, exit
    2, nothing written) what this machine cannot hold."""
    from convert.convert import preflight_conversion
    from quantize import memory
    from quantize.calibrate import resolve_device

    _, shape = preflight_conversion(model_dir, tp=args.tp, pp=args.pp, quant=quant,
                                    moe_tp=args.moe_tp, moe_ep=args.moe_ep, pad_heads=pad_heads)
    device = resolve_device(args.calib_device).type if quant.needs_calibration else "cpu"
    reused = getattr(args, "calibration", None) is not None
    # mixture-of-experts models calibrate whole (no layer-wise path for experts yet)
    stages = memory.plan(shape, quant, tp=args.tp, pp=args.pp, device=device,
                         out_dtype_bytes=4 if args.dtype == "float32" else 2,
                         layerwise=not shape.experts)
    if reused:
        stages = [s for s in stages if s.name != "calibration"]
    print(f"memory plan: {memory.describe(stages)}")
    memory.check(stages, out, device)


def _calibration_run(args, out: Path, quant, tokenizer):
    """The layer-wise calibration of this build: into OUTPUT/calibration (kept: reusable with
    --calibration, resumable), or the --calibration store of an earlier build; None when the
    format needs none."""
    from quantize.run import CalibrationRun

    if not quant.needs_calibration:
        if getattr(args, "calibration", None) is not None:
            raise UserError(f"--calibration applies to calibrated formats; {quant.name} needs none "
                            f"(drop --calibration)")
        return None
    device = getattr(args, "calib_device", "auto")
    if getattr(args, "calibration", None) is not None:
        return CalibrationRun(store=Path(args.calibration), reuse=True, device=device,
                              tokenizer=tokenizer)
    return CalibrationRun(store=out / "calibration", device=device, tokenizer=tokenizer)


def _head_padding(args, model_dir, quant, pad_heads: bool) -> dict | None:
    """Check tp against the heads (one line naming --pad-heads when it would help), print the
    padding that will be applied, or that --pad-heads has nothing to do; build.json's layout."""
    from convert.convert import preflight_conversion

    _, shape = preflight_conversion(model_dir, tp=args.tp, pp=args.pp, quant=quant,
                                    moe_tp=args.moe_tp, moe_ep=args.moe_ep, pad_heads=pad_heads)
    if shape.padding is not None:
        print(f"heads: padded {shape.padding.describe()} so that tp {args.tp} splits them")
        return {"head_padding": shape.padding.as_dict()}
    if args.pad_heads:
        print(f"build_engine: note: --pad-heads: {shape.heads} heads / {shape.kv_heads} KV heads "
              f"already split over tp {args.tp}; nothing padded", file=sys.stderr)
    return None


def _refuse_padding_for_pytorch(args, model_dir, pad_heads: bool) -> None:
    """--target pytorch writes a Hugging Face checkpoint that TensorRT-LLM's PyTorch backend
    splits over tp itself when it loads it: a padded layout is not ours to choose there."""
    from convert.hf_config import model_shape, preflight, read_hf_config

    if not pad_heads:
        return
    shape = preflight(model_shape(read_hf_config(model_dir)), args.tp, args.pp, pad_heads=True,
                      can_pad=False)
    if shape.padding is not None:
        raise UserError(f"--target pytorch cannot pad heads ({shape.padding.describe()}): the "
                        f"PyTorch backend splits the Hugging Face checkpoint's {shape.heads} heads "
                        f"over tp itself when it loads it; use a --tp that divides them or "
                        f"--target engine")


def _quant_tokenizer(args, quant, model_dir):
    """The tokenizer that calibration and a quantized --verify (real text) need, loaded up front so
    that a model without one is refused before any work (one line, exit 2); None when not needed.
    The model's own refusals (missing config, tp/pp, format vs shapes) come first (_head_padding)."""
    from quantize.calibrate import load_tokenizer

    verify_text = args.verify and quant.is_quantized
    if not (quant.needs_calibration or verify_text):
        return None
    if verify_text:
        return load_tokenizer(model_dir, "--verify of a quantized checkpoint (on real text)",
                              "; or drop --verify")
    return load_tokenizer(model_dir)


def _quality_gate(ckpt, model_dir, quant, tokenizer) -> dict:
    """Measure (and print) the quantized checkpoint against the float model on held-back calibration
    text; ``passed`` is False only for a breach of --max-ppl-increase."""
    from quantize.calibrate import held_back_ids
    from verify.quality_gate import GATE_TOKENS, gate_line, measure

    ids, overlaps = held_back_ids(quant.read_calib_text(), tokenizer, quant, GATE_TOKENS)
    r = measure(ckpt, model_dir, ids)
    limit = quant.max_ppl_increase
    print(gate_line(quant.recipe or quant.name, r, overlaps, limit))
    return {**r, "overlaps_calibration": overlaps, "max_ppl_increase": limit,
            "passed": limit is None or r["increase_pct"] <= limit}


def _discard(out: Path, ckpt: Path, store: Path | None = None) -> None:
    """A run that failed its quality gate keeps nothing that looks complete: its checkpoint (and
    ``store``, its calibration) goes, and so do the outputs of an earlier run it was replacing
    (--force), which would now look current."""
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)
    for name in ("engines", "triton"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "build.json").unlink(missing_ok=True)
    try:
        out.rmdir()  # only when nothing else is in it
    except OSError:
        pass


def _verify(ckpt, model_dir, quant, tokenizer):
    """The reference reader's check of a written checkpoint against the float HF model. A quantized
    one is checked on real text (the calibration text's start): argmax agreement with the float
    model is meaningful there, unlike on random ids, for a format's coarse logits."""
    from verify.reference import verify

    if quant.is_quantized:
        return verify(ckpt, model_dir, text=quant.read_calib_text()[:2000], tokenizer=tokenizer)
    return verify(ckpt, model_dir)


def _defaults_from_other_flags(args) -> None:
    """Defaults that follow other flags: --build-workers follows --workers (trtllm-build has
    one --workers for both); --triton-target follows --target (the repository that target's
    output is served with), so build.json and triton_repo.json record what was written."""
    if args.build_workers is None:
        args.build_workers = args.workers
    if getattr(args, "triton_target", "none") is None:
        args.triton_target = getattr(args, "target", "engine")


def _check_triton_args(args, model_dir) -> None:
    """Refuse, before any work, Triton options that would fail after the conversion."""
    from builders.triton import TritonOptions, check_tokenizer

    if args.checkpoint_only or args.triton_target == "none":
        return
    TritonOptions.from_any(args)  # ranges and choices, one line each
    if args.triton_target == "pytorch":
        raise UserError("--triton-target pytorch serves a Hugging Face checkpoint on TensorRT-LLM's "
                        "PyTorch backend, not engines; use --triton-target engine (or none) here")
    if args.from_checkpoint and args.tokenizer_dir is None:
        raise UserError("--from-checkpoint needs --tokenizer-dir DIR (the HF model dir with the "
                        "tokenizer files) for the Triton pre/postprocessing models, or pass "
                        "--triton-target none")
    where = "--tokenizer-dir" if args.tokenizer_dir is not None else "model dir"
    try:
        check_tokenizer(args.tokenizer_dir or model_dir, what=where)
    except UserError as e:
        raise UserError(f"{e} (or --triton-target none to skip the Triton repository)") from None


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
