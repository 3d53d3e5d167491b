"""The checks of a written checkpoint: the quality gate of a calibrated run, ``--verify`` (logits
against the HF model) and ``--eval-ppl``; a failed gate leaves nothing that looks complete."""
from __future__ import annotations

import math
from pathlib import Path


def quality_gate(ckpt, model_dir, quant, tokenizer) -> dict:
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


def discard(out: Path, ckpt: Path, store: Path | None = None) -> None:
    """A run that failed its quality gate keeps nothing that looks complete: its staged checkpoint
    (and ``store``, its calibration) goes; both targets check the checkpoint staged, so an
    earlier output stays as it was. Only the tool's own directories are removed
    (common.ownership)."""
    from common.ownership import foreign, remove_owned

    for p in (ckpt, store):
        if p is not None and foreign(p) is None:
            remove_owned(p)
    try:
        out.rmdir()  # only when nothing else is in it
    except OSError:
        pass


def verify(ckpt, model_dir, quant, tokenizer):
    """The reference reader's check of a written checkpoint against the float HF model. A quantized
    one is checked on real text (the calibration text's start): argmax agreement with the float
    model is meaningful there, unlike on random ids, for a format's coarse logits."""
    from verify.reference import verify

    if quant.format.quantized(quant):
        return verify(ckpt, model_dir, text=quant.read_calib_text()[:2000], tokenizer=tokenizer)
    return verify(ckpt, model_dir)


#: a gate result this bad is a broken model, not a lossy format (every format measured on SmolLM2
#: keeps >= 80 % top-1 agreement and < 2x the float perplexity, BENCHMARKS.md "Quality"): e.g. a
#: calibration of other weights (issue 29). Top-1 agreement counts only where the float model
#: predicts the text (perplexity under half the vocabulary): a random model's top-1 is noise.
MIN_TOP1_AGREEMENT = 0.5
MAX_PPL_RATIO = 4.0


def broken(gate: dict) -> str | None:
    """Why a gate result shows a broken checkpoint, or None."""
    ppl, fppl, top1 = gate["ppl"], gate["float_ppl"], gate["top1_agreement"]
    if not (math.isfinite(ppl) and math.isfinite(fppl)):
        return f"perplexity {ppl:.4g} vs float {fppl:.4g} is not finite"
    if ppl > MAX_PPL_RATIO * fppl:
        return f"perplexity {ppl:.4f} > {MAX_PPL_RATIO:g}x the float model's {fppl:.4f}"
    if top1 < MIN_TOP1_AGREEMENT and fppl < gate.get("vocab", math.inf) / 2:
        return (f"top-1 agreement with the float model {100 * top1:.1f}% < "
                f"{100 * MIN_TOP1_AGREEMENT:.0f}%")
    return None


def gate_step(out: Path, ckpt: Path, model_dir, quant, tokenizer, timings: dict,
              store: Path | None = None, allow_quality_loss: bool = False) -> dict:
    """The quality gate of a calibrated run, timed; on a breach of --max-ppl-increase, or a result
    that shows a broken checkpoint (:func:`broken`, unless ``allow_quality_loss``), nothing is
    kept (``store``: this run's own calibration store) and the run fails (one line, exit 1). Returns build.json's "quantization" record."""
    import time

    from common.errors import UserError

    t0 = time.perf_counter()
    gate = quality_gate(ckpt, model_dir, quant, tokenizer)
    timings["quality_gate"] = time.perf_counter() - t0
    if not gate["passed"]:  # the user's own bound first: its message names the flag
        discard(out, ckpt, store)
        raise UserError(f"the quality gate failed: perplexity +{gate['increase_pct']:.2f}% over the "
                        f"float model > --max-ppl-increase {quant.max_ppl_increase:g}%; nothing was "
                        f"kept (try another recipe or alpha, e.g. --smoothquant auto, or more "
                        f"--calib-size)", exit_code=1)
    why = None if allow_quality_loss else broken(gate)
    if why is not None:
        gate["passed"] = False
        discard(out, ckpt, store)
        raise UserError(f"the quality gate failed: {why}; the checkpoint is broken (e.g. "
                        f"calibrated on another model's weights, or damaged weights); nothing "
                        f"was kept (pass --allow-quality-loss to keep it anyway)", exit_code=1)
    return {"quant_algo": quant.quant_algo, "recipe": quant.recipe or quant.name, "quality_gate": gate}


def verify_step(ckpt: Path, model_dir, quant, tokenizer, timings: dict, shown=None) -> bool:
    """--verify: print the reference reader's verdict; False on a mismatch. ``shown``: the
    checkpoint's name in the verdict (where a staged one goes), default ``ckpt``."""
    import time

    from verify.reference import summary_line

    t0 = time.perf_counter()
    report, passed = verify(ckpt, model_dir, quant, tokenizer)
    timings["verify"] = time.perf_counter() - t0
    print(f"verify: {summary_line(report, ckpt if shown is None else shown)}")
    return passed


def lora_verify_step(ckpt: Path, model_dir, lora_root: Path, lora, quant, tokenizer,
                     timings: dict, shown=None) -> bool:
    """--verify with --lora: each converted adapter run by the reference reader as TensorRT-LLM's
    runtime applies it, against HF + PEFT (verify/lora_reader.py); False on a mismatch."""
    import time

    from verify.lora_reader import verify_adapters
    from verify.reference import summary_line

    t0 = time.perf_counter()
    ids = None
    if quant.format.quantized(quant):  # real text, as the base check of a quantized checkpoint
        ids = tokenizer(quant.read_calib_text()[:2000], return_tensors="pt")["input_ids"]
    reports = verify_adapters(ckpt, model_dir, lora_root,
                              [(a.task_id, a.directory) for a in lora.adapters], input_ids=ids)
    timings["verify_lora"] = time.perf_counter() - t0
    for report, _ in reports:
        print(f"verify: lora task {report['task_id']} ({report['adapter']}, vs HF + PEFT): "
              f"{summary_line(report, ckpt if shown is None else shown)}")
    return all(ok for _, ok in reports)


def eval_ppl_step(ckpt: Path, model_dir, text: str, timings: dict) -> None:
    """--eval-ppl: the checkpoint's and the HF model's perplexity on the user's text."""
    import time

    from verify.perplexity import checkpoint_ppl, hf_ppl, ppl_line

    t0 = time.perf_counter()
    print(ppl_line("checkpoint", checkpoint_ppl(ckpt, text, hf_dir=model_dir)))
    print(ppl_line("Hugging Face model", hf_ppl(model_dir, text)))
    timings["eval_ppl"] = time.perf_counter() - t0
