"""Quality of each quantization format on a real model (SmolLM2-135M, Gemma-3-270M): perplexity through
the CPU reference reader.

    python benchmarks/bench_quality.py --write-md BENCHMARKS.md      # ~15-25 min on 2 CPU cores
    python benchmarks/bench_quality.py --model gemma3 --calib-size 8 --results r.jsonl \
        --cli-row= --cli-row=--fp8 --cli-row="--int4-weight-only"    # rows build_engine writes
    python benchmarks/bench_quality.py --table-from r.jsonl --write-md BENCHMARKS.md --md-block gemma3

``--model``: a HF directory, or ``smollm2`` / ``gemma3`` (examples/smollm2.py, examples/gemma3.py).
``--cli-row FLAGS`` (benchmarks/quality_cli.py): any model and format ``build_engine`` takes, each
row's checkpoint written by ``build_engine --checkpoint-only`` itself (its dtype, tp and padding),
reported as perplexity, ratio to the float model and top-1 agreement with it, one JSON line per row.
The formats table below writes fp16 tp-1 checkpoints of SmolLM2 through the converter's API.

Calibration: ``--calib-file`` (default: tests/data/shakespeare.txt, the public-domain Shakespeare
text shipped with the tests, 20,000 characters, about 6,000 SmolLM2 tokens), ``--calib-size`` x
``--calib-seq-len`` tokens (default 16 x 256: CPU calibration is the cost; the converter's default
is 32 x 512). Samples are consecutive windows from the start of the text, so the shipped prefix
gives the same samples as the full text up to about 6,000 tokens; for more, pass a longer text.
Evaluation: a fixed slice of ``--eval-file`` (default: tests/data/austen.txt, the shipped
public-domain Austen text, 200,000 characters; from character
``--eval-offset``), ``--ppl-tokens`` tokens in windows of ``--ppl-seq-len`` (each window scored from
its own start), the same windows for every row. Every checkpoint is fp16 at tp 1 and runs through
``verify.reference`` (TensorRT-LLM's semantics on CPU, quantization simulated).

Columns (one modelopt calibration per row feeds all three): "ours" = this project's converter
(``convert_checkpoint(..., quant=spec, calibrated_model=model)``, what ``build_engine`` writes);
"modelopt" = nvidia-modelopt 0.47's own ``export_tensorrt_llm_checkpoint`` of the same calibrated
model; "PyTorch target" = our modelopt "unified" HF checkpoint (``--target pytorch``,
``quantize.unified.write_unified_checkpoint`` of the same model) read by ``verify.unified_reader``
("–": a format the unified checkpoint does not have). The table is written between ``<!-- quality:begin -->`` and
``<!-- quality:end -->`` in the markdown file.

``--smoothquant-table``: instead, the SmoothQuant recipes side by side (TensorRT-LLM's four plugin
formats, alpha 0.5 / 0.75 / 1.0 / auto, and modelopt's recipe), written between
``<!-- sq-quality:begin -->`` and ``<!-- sq-quality:end -->``. One forward-hook range capture feeds
every plugin row (ranges do not depend on alpha); each modelopt row is its own calibration.
"""
from __future__ import annotations

import argparse
import copy
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from verify.perplexity import checkpoint_ppl, hf_ppl, windows, tokenize  # noqa: E402

TEXTS = REPO / "tests" / "data"  # public-domain texts shipped with the tests

# (label, quant_algo, kv dtype, smoothquant alpha, awq block) -- one table row each
ROWS = [
    ("fp16", None, None, None, None),
    ("W8A16 (int8 weight-only)", "W8A16", None, None, None),
    ("W4A16 (int4 weight-only)", "W4A16", None, None, None),
    ("SmoothQuant W8A8, alpha 1.0", "W8A8_SQ_PER_CHANNEL", None, 1.0, None),
    ("SmoothQuant W8A8, alpha 0.5", "W8A8_SQ_PER_CHANNEL", None, 0.5, None),
    ("FP8", "FP8", None, None, None),
    ("FP8 + FP8 KV cache", "FP8", "fp8", None, None),
    ("INT4 AWQ, group 64", "W4A16_AWQ", None, None, 64),
    ("fp16 + INT8 KV cache", None, "int8", None, None),
    ("fp16 + FP8 KV cache", None, "fp8", None, None),
    ("FP8 rowwise, MLP only (`--fp8-rowwise`)", "FP8_PER_CHANNEL_PER_TOKEN", None, None, None),
    ("FP8 rowwise, Meta's recipe (`--fp8-rowwise meta`)", "FP8_PER_CHANNEL_PER_TOKEN", None, None, None),
    ("NVFP4 (`--nvfp4`)", "NVFP4", None, None, None),
    ("NVFP4 + FP8 KV cache", "NVFP4", "fp8", None, None),
]
#: a row's recipe option (QuantSpec.recipe_option), by label
RECIPE_OPTIONS = {"FP8 rowwise, MLP only (`--fp8-rowwise`)": "mlp",
                  "FP8 rowwise, Meta's recipe (`--fp8-rowwise meta`)": "meta"}

# --smoothquant-table rows: (label, quant_algo, alpha ("auto": searched))
PT = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
SQ_ROWS = [
    ("TensorRT-LLM per-channel + per-token, alpha 0.5 (TensorRT-LLM's default alpha)", PT, 0.5),
    ("TensorRT-LLM per-channel + per-token, alpha 0.75 (default `--smoothquant`)", PT, 0.75),
    ("TensorRT-LLM per-channel + per-token, alpha 1.0", PT, 1.0),
    ("TensorRT-LLM per-channel + per-token, alpha auto (per layer)", PT, "auto"),
    ("TensorRT-LLM per-tensor weights + per-token, alpha 0.5", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", 0.5),
    ("TensorRT-LLM per-channel + static per-tensor, alpha 0.5", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", 0.5),
    ("TensorRT-LLM per-tensor + static per-tensor, alpha 0.5", "W8A8_SQ_PER_TENSOR_PLUGIN", 0.5),
    ("modelopt recipe (`--sq-recipe modelopt`), alpha 1.0", "W8A8_SQ_PER_CHANNEL", 1.0),
    ("modelopt recipe, alpha 0.5", "W8A8_SQ_PER_CHANNEL", 0.5),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def spec_for(algo, kv, alpha, block, args, option=None):
    from quantize.formats import QuantSpec

    return QuantSpec.create(algo, kv_cache_dtype=kv, smoothquant_alpha=alpha, awq_block_size=block,
                            calib_size=args.calib_size, calib_seq_len=args.calib_seq_len,
                            calib_batch_size=1, recipe_option=option)


def calibrated_model(hf_dir, spec, calib_text, tok):
    """modelopt's calibration of the HF model for ``spec`` (None when the format needs none),
    and its seconds. One calibrated model feeds all three columns of a row."""
    from quantize.calibrate import calibrate

    if not spec.needs_calibration:
        return None, None
    t = time.time()
    model = calibrate(hf_dir, spec, calib_text, tokenizer=tok, device="cpu", progress=False)
    return model, time.time() - t


def ours_checkpoint(hf_dir, out, spec, model):
    """This project's TRT-LLM checkpoint (build_engine's converter) for ``spec``."""
    sys.path.insert(0, str(REPO / "tests"))
    from convert_helper import convert_checkpoint  # the whole-model calibrated path is test-only

    convert_checkpoint(hf_dir, out, dtype="float16", progress=False, quant=spec,
                       calibrated_model=model)
    return out


def modelopt_checkpoint(out, model):
    """nvidia-modelopt's own export_tensorrt_llm_checkpoint of the same calibrated model."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)  # the export re-smooths / pads the model in place
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type="llama", dtype=torch.float16, export_dir=out,
                                   inference_tensor_parallel=1)
    return out


def unified_checkpoint(hf_dir, out, spec, model):
    """The PyTorch target: our modelopt "unified" HF checkpoint (None: format not supported)."""
    from common.errors import UserError
    from quantize.unified import check_supported, write_unified_checkpoint

    try:
        check_supported(spec)
    except UserError:
        return None
    write_unified_checkpoint(hf_dir, out, spec, calibrated_model=model, progress=False)
    return out


def fmt(p, base):
    if p is None:
        return "pending"
    return f"{p:.3f} ({100 * (p / base - 1):+.2f} %)"


def sq_rows(args, tok, calib_text, eval_text, kw, work):
    """The --smoothquant-table rows: (label, algo, alpha, ppl, calibration s, note)."""
    from quantize.calibrate import calibration_inputs
    from quantize.formats import QuantSpec
    from quantize.smoothquant import capture_ranges, smooth_model
    from quantize.sq_reference import PluginCalibration
    from quantize.sq_search import SEARCH_TOKENS, search_alphas

    out = []
    spec0 = QuantSpec.create(PT, calib_size=args.calib_size, calib_seq_len=args.calib_seq_len)
    t = time.time()
    model, batches, _ = calibration_inputs(args.model, spec0, calib_text, tokenizer=tok, device="cpu")
    ranges = capture_ranges(model, batches, keep_inputs=SEARCH_TOKENS)
    capture_s = time.time() - t
    n = len(model.model.layers)
    for i, (label, algo, alpha) in enumerate(SQ_ROWS):
        t = time.time()
        note = ""
        spec = QuantSpec.create(algo, smoothquant_alpha=alpha, calib_size=args.calib_size,
                                calib_seq_len=args.calib_seq_len, calib_batch_size=1)
        if spec.is_sq_plugin:
            if alpha == "auto":
                alphas, _ = search_alphas(model, ranges, algo)
                note = "alphas " + " ".join(f"{a:g}" for a in alphas)
            else:
                alphas = [alpha] * n
            cal = PluginCalibration(smooth_model(model, ranges, alphas), alphas)
            calib_s = capture_s + time.time() - t
        else:
            cal, calib_s = calibrated_model(args.model, spec, calib_text, tok)
        ppl = checkpoint_ppl(ours_checkpoint(args.model, work / f"sq{i}", spec, cal), eval_text, tok,
                             **kw)["perplexity"]
        out.append((label, algo, alpha, ppl, calib_s, note))
        log(f"{label}: {ppl:.4f} ({time.time() - t:.0f}s) {note}")
    return out


def sq_table(rows, base) -> list[str]:
    lines = ["| recipe | quant_algo | alpha | perplexity (vs float) | calibration s |", "|---|---|---:|---:|---:|"]
    for label, algo, alpha, ppl, calib_s, _ in rows:
        lines.append(f"| {label} | {algo} | {alpha} | {fmt(ppl, base)} | {calib_s:.0f} |")
    notes = [f"{label}: {note}" for label, *_, note in rows if note]
    return lines + ([""] + [f"Chosen by `--smoothquant auto`: {n}" for n in notes] if notes else [])


def write_block(path, begin, end, table):
    p = Path(path)
    s = p.read_text(encoding="utf-8")
    if begin in s and end in s:
        s = s[: s.index(begin) + len(begin)] + "\n" + table + "\n" + s[s.index(end):]
    else:
        s = s.rstrip("\n") + "\n\n" + begin + "\n" + table + "\n" + end + "\n"
    p.write_text(s, encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir, or smollm2 / gemma3 (the examples' real models; default smollm2)")
    ap.add_argument("--calib-file", default=str(TEXTS / "shakespeare.txt"))
    ap.add_argument("--eval-file", default=str(TEXTS / "austen.txt"))
    ap.add_argument("--eval-offset", type=int, default=100_000, help="first character of the eval slice")
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--only", default=None, help="comma-separated row numbers (1-based) to run")
    ap.add_argument("--write-md", default=None, help="markdown file whose quality block is replaced")
    ap.add_argument("--smoothquant-table", action="store_true",
                    help="the SmoothQuant recipes table instead of the formats table")
    ap.add_argument("--cli-row", action="append", default=None, metavar="FLAGS",
                    help="instead of the formats table: one row whose checkpoint build_engine writes "
                         "with these flags ('' = float); repeatable (benchmarks/quality_cli.py)")
    ap.add_argument("--results", default="quality_results.jsonl",
                    help="--cli-row: JSON-lines file each measured row is appended to")
    ap.add_argument("--code-label", default="main", help="--cli-row: the code the rows ran (e.g. a commit)")
    ap.add_argument("--prebuilt", default=None,
                    help="--cli-row (one): measure this build_engine output dir instead of building")
    ap.add_argument("--float-cache", default=None,
                    help="--cli-row: file keeping the float model's side (perplexity, top-1 ids) of "
                         "these windows: read when present, else computed and written")
    ap.add_argument("--table-from", default=None, help="render a --results file as a markdown table")
    ap.add_argument("--table-model", default=None, help="--table-from: only this model's rows")
    ap.add_argument("--md-block", default="gemma3", help="--table-from --write-md: the block's name")
    args = ap.parse_args(argv)

    import quality_cli

    if args.table_from:
        return quality_cli.render(args, write_block)
    from transformers import AutoTokenizer

    if args.model in (None, "smollm2"):
        from examples.smollm2 import prepare_smollm2

        args.model = str(prepare_smollm2())
    elif args.model == "gemma3":
        from examples.gemma3 import prepare_gemma3

        args.model = str(prepare_gemma3())
    tok = AutoTokenizer.from_pretrained(args.model)
    calib_text = Path(args.calib_file).read_text(encoding="utf-8")
    raw = Path(args.eval_file).read_text(encoding="utf-8")[args.eval_offset:]
    need_chars = args.ppl_tokens * 8
    eval_text = raw[:need_chars]
    n_tok = windows(tokenize(eval_text, tok), args.ppl_seq_len, args.ppl_tokens).numel()
    kw = dict(seq_len=args.ppl_seq_len, max_tokens=args.ppl_tokens)

    if args.cli_row is not None:
        work = Path(tempfile.mkdtemp(prefix="bench_quality_cli_", dir=REPO.parent))
        try:
            wins = windows(tokenize(eval_text, tok), args.ppl_seq_len, args.ppl_tokens)
            quality_cli.run_rows(args, args.model, [w[None] for w in wins], work, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    t0 = time.time()
    hf = hf_ppl(args.model, eval_text, tok, **kw)
    log(f"HF: {hf['perplexity']:.4f} over {hf['tokens']} tokens")
    if args.smoothquant_table:
        work = Path(tempfile.mkdtemp(prefix="bench_sq_", dir=REPO.parent))
        try:
            rows = sq_rows(args, tok, calib_text, eval_text, kw, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        base = hf["perplexity"]
        table = "\n".join([
            f"Model: SmolLM2-135M, fp16 checkpoints at tp 1 written by this project's converter, perplexity through "
            f"the CPU reference reader (quantization simulated, per-token scales included). Evaluation: {n_tok} "
            f"tokens of `{Path(args.eval_file).name}` from character {args.eval_offset}, windows of "
            f"{args.ppl_seq_len}. Calibration: `{Path(args.calib_file).name}`, {args.calib_size} x "
            f"{args.calib_seq_len} tokens, fp32 on CPU. Measured {time.strftime('%Y-%m-%d')}, whole run "
            f"{time.time() - t0:.0f} s.", "", f"HF model (float32 compute): **{base:.3f}**", "",
            *sq_table(rows, base)])
        print(table)
        if args.write_md:
            write_block(args.write_md, "<!-- sq-quality:begin -->", "<!-- sq-quality:end -->", table)
        return 0
    rows = []
    only = {int(i) for i in args.only.split(",")} if args.only else None
    work = Path(tempfile.mkdtemp(prefix="bench_quality_", dir=REPO.parent))
    try:
        for i, (label, algo, kv, alpha, block) in enumerate(ROWS, 1):
            if only and i not in only:
                continue
            t = time.time()
            spec = spec_for(algo, kv, alpha, block, args, RECIPE_OPTIONS.get(label))
            model, calib_s = calibrated_model(args.model, spec, calib_text, tok)
            ours = checkpoint_ppl(ours_checkpoint(args.model, work / f"ours{i}", spec, model),
                                  eval_text, tok, **kw)["perplexity"]
            mo = uni = None
            if model is not None:
                mo = checkpoint_ppl(modelopt_checkpoint(work / f"mo{i}", model), eval_text, tok,
                                    **kw)["perplexity"]
            d = unified_checkpoint(args.model, work / f"uni{i}", spec, model)
            if d is not None:
                uni = checkpoint_ppl(d, eval_text, tok, **kw)["perplexity"]
            del model
            rows.append((label, algo, kv, ours, mo, uni, calib_s, time.time() - t))
            log(f"{label}: ours {ours} modelopt {mo} unified {uni} calib {calib_s} ({time.time() - t:.0f}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = hf["perplexity"]
    lines = [
        f"Model: SmolLM2-135M ({Path(args.model).name}), fp16 checkpoints at tp 1, perplexity through the CPU reference "
        f"reader (TensorRT-LLM semantics, quantization simulated). Evaluation: {n_tok} tokens of "
        f"`{Path(args.eval_file).name}` from character {args.eval_offset} in {n_tok // args.ppl_seq_len} "
        f"windows of {args.ppl_seq_len} ({hf['tokens']} scored). Calibration: `{Path(args.calib_file).name}`, "
        f"{args.calib_size} samples x {args.calib_seq_len} tokens, fp32 on CPU. Measured "
        f"{time.strftime('%Y-%m-%d')} on {platform.machine()}, torch {torch.__version__}; whole run "
        f"{time.time() - t0:.0f} s. Percentages are vs the HF model.",
        "",
        f"HF model (float32 compute): **{base:.3f}**",
        "",
        "| format | quant_algo / KV | ours | modelopt export | PyTorch target (unified) | calibration s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, algo, kv, ours, mo, uni, calib_s, _ in rows:
        cal = "" if calib_s is None else f"{calib_s:.0f}"
        mo_s = "–" if calib_s is None else fmt(mo, base)  # nothing calibrated: no modelopt export
        lines.append(f"| {label} | {algo or 'none'} / {kv or '–'} | {fmt(ours, base)} | {mo_s} | "
                     f"{'–' if uni is None else fmt(uni, base)} | {cal} |")
    table = "\n".join(lines)
    print(table)
    if args.write_md:
        p = Path(args.write_md)
        s = p.read_text(encoding="utf-8")
        b, e = "<!-- quality:begin -->", "<!-- quality:end -->"
        if b in s and e in s:
            s = s[: s.index(b) + len(b)] + "\n" + table + "\n" + s[s.index(e):]
        else:
            s = s.rstrip("\n") + "\n\n" + b + "\n" + table + "\n" + e + "\n"
        p.write_text(s, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
