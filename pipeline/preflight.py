"""The refusals of a ``build_engine`` run before any work, called while the BuildPlan is made
(pipeline.plan): layout, ranks, tokenizer, memory, Triton options (each one line, exit 2, nothing
written), and what they decide (head padding, the ranks of this run, the calibration store).
They read the parsed arguments: this is the boundary below which no Namespace goes."""
from __future__ import annotations

import sys
from pathlib import Path

from common.errors import UserError


def refuse_engine_only_flags(args, reuses_calibration: bool = False) -> None:
    """--target pytorch: the flags that only shape a TensorRT-LLM checkpoint, refused in one line
    (``reuses_calibration``: the format's unified checkpoint is written from a calibration store,
    so --calibration is not one of them)."""
    if args.ranks is not None:
        raise UserError("--ranks splits a TensorRT-LLM checkpoint and its engines over "
                        "runs (--target engine); the PyTorch target's unified "
                        "checkpoint is written whole: drop --ranks")
    if args.calibration is not None and not reuses_calibration:
        raise UserError("--calibration is reused by TensorRT-LLM checkpoints (--target "
                        "engine); the PyTorch target calibrates its unified checkpoint "
                        "itself: drop --calibration")
    if args.moe_tp is not None or args.moe_ep is not None:
        raise UserError("--moe-tp/--moe-ep split a TRT-LLM checkpoint (--target engine); "
                        "the PyTorch backend takes moe_tensor_parallel_size / "
                        "moe_expert_parallel_size when it loads the model: drop them")


def source_quantization(quant, model, target: str = "engine", reads_float=()):
    """A pre-quantized --model (config.json's ``quantization_config``) converts as it is: its spec
    (quantize/recipes/prequantized), refused in one line with a format or calibration flag, or
    with ``reads_float`` (the flags given that read the model as float: --verify, --eval-ppl)."""
    from convert.prequant.scheme import read_source_quant
    from quantize.formats import QuantSpec

    from convert.block_fp8 import block_size

    if target == "pytorch" and block_size(model.raw) is not None:
        return quant  # block-scaled fp8: read as its float model (convert/block_fp8.py)
    sq = read_source_quant(model.raw)
    if sq is None:
        return quant
    flags = [f for f, on in ((quant.format.flag or "--kv-cache-dtype", quant.format.quantized(quant)),
                             ("--max-ppl-increase", quant.max_ppl_increase is not None)) if on]
    if flags:
        raise UserError(f"{model.directory} is already quantized ({sq.words}): it converts as it "
                        f"is, without calibration; drop {' and '.join(flags)}")
    if reads_float:
        raise UserError(f"{' and '.join(reads_float)} read{'s' if len(reads_float) == 1 else ''} "
                        f"the model as float weights; {model.directory} is already quantized "
                        f"({sq.words}): drop {' and '.join(reads_float)}")
    spec = QuantSpec.for_source(sq)
    why = spec.format.unified_refusal(spec) if target == "pytorch" else None
    if why is not None:
        raise UserError(f"--target pytorch: {why}")
    return spec


def family_formats(quant, model, target: str) -> None:
    """The model's family has not been brought to this format on this target: one line."""
    from model.families import FAMILIES

    why = quant.format.family_refusal(quant, FAMILIES[model.shape.family], target)
    if why is None:  # the model's attention heads (an NVFP4 KV cache's blocks of 16)
        why = quant.format.head_refusal(quant, model.shape.head_size)
    if why is not None:
        raise UserError(why)


def gpu_capability(args, quant, model, target: str) -> list[str]:
    """The capability table (check/gpu.py) for this run, before any work: a refused cell is one
    line (UserError); returns the warning / note lines to print once the plan is made. The GPU
    is --gpu's, else this host's; build.json records it (options.target_gpu) when one is known."""
    from model.families import FAMILIES

    family = FAMILIES[model.shape.family].name
    return _capability(args, quant.quant_algo, quant.kv_cache_quant_algo, model.shape.experts > 0,
                       family, target, quant.format.quantized(quant))


def checkpoint_gpu_capability(args, config: dict) -> list[str]:
    """:func:`gpu_capability` for --from-checkpoint: the checkpoint's own format and family."""
    from model.families import ARCHITECTURES

    q = config.get("quantization") or {}
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    return _capability(args, algo, kv, bool(config.get("moe")),
                       ARCHITECTURES.get(config.get("architecture")), "engine",
                       algo is not None or kv is not None)


def _capability(args, algo, kv, moe: bool, family, target: str, quantized: bool) -> list[str]:
    from check.gpu import REFUSE, Run, broken, line, parse_gpu

    given = getattr(args, "gpu", None)
    label, sm = parse_gpu(given) if given is not None else _host_gpu()
    run = Run(algo, kv, moe=moe, lora=bool(getattr(args, "lora", None)), family=family,
              target=target, sm=sm)
    cells = broken(run)
    for cell in cells:
        if cell.level == REFUSE:
            raise UserError(line(cell, label, sm))
    notes = [f"build_engine: warning: {line(c, label, sm)}" for c in cells]
    if sm is None and quantized:
        notes.append("gpu: no --gpu and no GPU on this host: the GPU rows of the capability "
                     "table (check/gpu.py) were not applied; give --gpu NAME|sm_XX")
    if sm is not None:
        args.target_gpu = {"name": label, "sm": sm, "from": "--gpu" if given else "this host"}
    return notes


def _host_gpu(proc: Path = Path("/proc/driver/nvidia/gpus")) -> tuple[str | None, int | None]:
    """(name, SM) of this host's first NVIDIA GPU as its driver names it, or (None, None): read
    from the driver's /proc entry, not through torch (the float path imports no torch, and no
    CUDA context is made for a table lookup); a name the table does not know gives no SM."""
    from check.gpu import sm_of_name

    for info in sorted(proc.glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                name = line.split(":", 1)[1].strip()
                return name, sm_of_name(name)
    return None, None


def refuse_padding_for_pytorch(args, model, pad_heads: bool) -> None:
    """--target pytorch writes a Hugging Face checkpoint that TensorRT-LLM's PyTorch backend
    splits over tp itself when it loads it: a padded layout is not ours to choose there."""
    from model.shape import preflight

    if not pad_heads:
        return
    shape = preflight(model.shape, args.tp, args.pp, pad_heads=True, can_pad=False)
    if shape.padding is not None:
        raise UserError(f"--target pytorch cannot pad heads ({shape.padding.describe()}): the "
                        f"PyTorch backend splits the Hugging Face checkpoint's {shape.heads} heads "
                        f"over tp itself when it loads it; use a --tp that divides them or "
                        f"--target engine")


def head_padding(args, shape) -> dict | None:
    """Print the head padding that will be applied (``shape``: as laid out for tp), or that
    --pad-heads has nothing to do; build.json's layout."""
    if shape.padding is not None:
        print(f"heads: padded {shape.padding.describe()} so that tp {args.tp} splits them")
        return {"head_padding": shape.padding.as_dict()}
    if args.pad_heads:
        print(f"build_engine: note: --pad-heads: {shape.heads} heads / {shape.kv_heads} KV heads "
              f"already split over tp {args.tp}; nothing padded", file=sys.stderr)
    return None


def hidden_padding(args, shape, quant) -> dict | None:
    """Print the hidden-size padding the format's TensorRT-LLM linears need (``shape``: as laid
    out; quantize.apply.pad_features); build.json's layout."""
    if not shape.padded_hidden:
        return None
    real, padded = shape.hidden, shape.padded_hidden
    cost = round(100 * (padded - real) / real)
    summary = (f"{real} -> {padded} (exact: zero features, RMSNorm weights x sqrt({real}/{padded}) "
               f"and norm_epsilon x {real}/{padded}; +{cost} % hidden features) for TensorRT-LLM's "
               f"{quant.quant_algo} linears at tp {args.tp}")
    print(f"hidden: padded {summary}")
    return {"hidden_padding": {
        "hidden_size": [real, padded], "multiple": quant.format.feature_multiple(quant) * args.tp,
        "norm_weight_scale": shape.norm_scale, "norm_epsilon_scale": real / padded,
        "extra_hidden_percent": cost,
        # the rescaled norm weights are exact in float32; float16 / bfloat16 round them
        "rounding": "norm weights rounded to the checkpoint dtype after the rescale",
        "summary": summary}}


def conversion_ranks(args, quant):
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
    if quant.format.calibration(quant) is not None:
        raise UserError(f"--ranks cannot split a calibrated format ({quant.name}) over runs: "
                        "the ranks of two calibrations must not be mixed; convert every rank in "
                        "one run (CPU only) and use --ranks with --from-checkpoint for engines")
    return ranks


def quant_tokenizer(args, quant, model):
    """The tokenizer that calibration and a quantized --verify (real text) need, loaded up front so
    that a model without one is refused before any work (one line, exit 2); None when not needed.
    The model's own refusals (missing config, tp/pp, format vs shapes) come first (the layout)."""
    verify_text = args.verify and quant.format.quantized(quant)
    if not (quant.format.gated(quant) or verify_text):  # calibration or the quality gate
        return None
    if verify_text:
        tokenizer = model.tokenizer("--verify of a quantized checkpoint (on real text)",
                                    "; or drop --verify")
    else:
        tokenizer = model.tokenizer()
    check_vocab(tokenizer, model.shape.vocab, model.directory)
    calibration_text(quant, tokenizer)
    return tokenizer


def calibration_text(quant, tokenizer) -> None:
    """A calibrated format's text holds at least one whole sample (one line, before any work)."""
    if quant.format.calibration(quant) is not None:
        from quantize.calibrate import check_calib_tokens

        check_calib_tokens(quant, tokenizer)


def check_vocab(tokenizer, vocab_size: int, where) -> None:
    """A tokenizer whose ids reach past the model's embedding is another model's: refused before
    calibration feeds them to it."""
    if vocab_size and len(tokenizer) > int(vocab_size):
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {vocab_size}; is it the tokenizer of this model? (fix the "
                        f"model directory's tokenizer files)")


def memory_plan(args, quant, shape, out: Path) -> None:
    """Print the expected peak host RAM / device memory / disk per stage (``shape``: as laid out);
    refuse (one line, exit 2, nothing written) what this machine cannot hold."""
    from quantize import memory

    device = calibration_device(args, quant)
    reused = getattr(args, "calibration", None) is not None
    # mixture-of-experts models calibrate whole (no layer-wise path for experts yet)
    stages = memory.plan(shape, quant, tp=args.tp, pp=args.pp, device=device,
                         out_dtype_bytes=4 if args.dtype == "float32" else 2,
                         layerwise=not shape.experts,
                         checks=memory.checks(args.verify, getattr(args, "eval_ppl", None)),
                         workers=args.workers)
    if reused:
        stages = [s for s in stages if s.name != "calibration"]
    print(f"memory plan: {memory.describe(stages)}")
    memory.check(stages, out, device)


def calibration_device(args, quant) -> str:
    """The device type the calibration runs on ("cpu" for a format that needs none)."""
    if not quant.needs_calibration:  # quantize.calibrate imports torch: not on the float path
        return "cpu"
    from quantize.calibrate import resolve_device

    return resolve_device(args.calib_device).type


def calibration_run(args, out: Path, quant, tokenizer):
    """The layer-wise calibration of this build: into OUTPUT/calibration (kept: reusable with
    --calibration, resumable), or the --calibration store of an earlier build; None when the
    format needs none."""
    if quant.format.calibration(quant) is None:
        if getattr(args, "calibration", None) is not None:
            raise UserError(f"--calibration applies to calibrated formats; {quant.name} needs none "
                            f"(drop --calibration)")
        return None
    from quantize.run import CalibrationRun  # imports torch: calibrated formats only

    device = getattr(args, "calib_device", "auto")
    if getattr(args, "calibration", None) is not None:
        return CalibrationRun(store=Path(args.calibration), reuse=True, device=device,
                              tokenizer=tokenizer)
    return CalibrationRun(store=out / "calibration", device=device, tokenizer=tokenizer)


def check_triton_args(args, model_dir, vocab_size: int | None = None) -> None:
    """Refuse, before any work, Triton options that would fail after the conversion
    (``vocab_size``: the model's or the checkpoint's; a tokenizer with more tokens is another
    model's)."""
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
        check_tokenizer(args.tokenizer_dir or model_dir, vocab_size, what=where)
    except UserError as e:
        raise UserError(f"{e} (or --triton-target none to skip the Triton repository)") from None
