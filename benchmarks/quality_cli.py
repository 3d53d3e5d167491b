"""bench_quality's ``--cli-row`` mode: each row's checkpoint is what ``build_engine`` itself writes.

One row per ``--cli-row "FLAGS"`` (build_engine's own flags, e.g. ``"--fp8"``, ``"--awq --awq-act fp8
--tp 2 --pad-heads"``; ``""`` is the float checkpoint): ``build_engine --model DIR --checkpoint-only
--calib-data <calib file> --calib-size N --calib-seq-len L --allow-quality-loss FLAGS`` (layer-by-layer
calibration, the padding and tp layout the CLI chooses), then the checkpoint through the CPU reference
reader (verify.model.ReferenceModel, every tp rank) on the evaluation windows, against the float
Hugging Face model (float32, verify.float_model) on the same windows:

- perplexity, and its ratio to the float model's;
- top-1 agreement: the fraction of evaluated positions (every position of every window) where the
  checkpoint's most likely next token is the float model's.

Each finished row is appended to ``--results FILE`` as one JSON line (a long run loses nothing when
it stops; runs of different code snapshots share a file); ``--table-from FILE`` renders the rows of a
results file as a markdown table (written between ``<!-- quality-NAME:begin -->`` / ``:end -->`` with
``--write-md`` and ``--md-block NAME``). A row refused by build_engine (exit 2) is recorded with its
one-line reason.
"""
from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def score(batches: list[Tensor], logits, vocab: int) -> tuple[float, list[Tensor]]:
    """(negative log-likelihood summed over every window's scored tokens, each window's top-1 ids)."""
    nll, top = 0.0, []
    for batch, lg in zip(batches, logits, strict=True):
        lg = lg[..., :vocab].double()
        nll -= float(F.log_softmax(lg[:, :-1], -1).gather(-1, batch[:, 1:, None]).sum())
        top.append(lg.argmax(-1))
        del lg
    return nll, top


def float_side(hf_dir: str, batches: list[Tensor]) -> dict:
    """The float HF model's perplexity and top-1 ids on ``batches`` (float32 compute)."""
    from verify.float_model import float_logits, hf_vocab_size

    vocab = hf_vocab_size(hf_dir)
    with torch.no_grad():
        nll, top = score(batches, float_logits(hf_dir, batches), vocab)
    count = sum(b[:, 1:].numel() for b in batches)
    return {"ppl": math.exp(nll / count), "top": top, "vocab": vocab, "tokens": count}


def checkpoint_side(ckpt: Path, batches: list[Tensor], flt: dict) -> dict:
    """The checkpoint's perplexity and top-1 agreement with the float model on ``batches``."""
    from verify.model import ReferenceModel

    ref = ReferenceModel(ckpt, lazy=True)
    vocab = min(ref.vocab_size, flt["vocab"])
    with torch.no_grad():
        nll, top = score(batches, ref.forward_windows(batches), vocab)
    agree = sum(int((q == f).sum()) for q, f in zip(top, flt["top"]))
    ppl = math.exp(nll / flt["tokens"])
    return {"ppl": ppl, "ratio": ppl / flt["ppl"], "top1": agree / sum(b.numel() for b in batches)}


def build(model_dir: str, flags: str, out: Path, args) -> tuple[int, str]:
    """build_engine --checkpoint-only for one row, in a child process (its memory is returned when
    it ends): (exit code, its stdout + stderr)."""
    argv = ["--model", model_dir, "--output", str(out), "--checkpoint-only", "--no-progress",
            "--allow-quality-loss", "--calib-data", args.calib_file, "--calib-size",
            str(args.calib_size), "--calib-seq-len", str(args.calib_seq_len), *shlex.split(flags)]
    code = "import sys; from builders.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def run_rows(args, model_dir: str, batches: list[Tensor], work: Path, log) -> None:
    """Every ``--cli-row``, each appended to ``args.results`` when measured."""
    t = time.time()
    cache = Path(args.float_cache) if args.float_cache else None
    if cache is not None and cache.is_file():  # the float side of the same model and windows
        flt = torch.load(cache)
        assert flt["windows"] == [b.tolist() for b in batches], f"{cache}: other windows"
    else:
        flt = float_side(model_dir, batches)
        flt["windows"] = [b.tolist() for b in batches]
        if cache is not None:
            torch.save(flt, str(cache) + ".tmp")
            Path(str(cache) + ".tmp").rename(cache)
    log(f"float model: perplexity {flt['ppl']:.4f} over {flt['tokens']} tokens ({time.time() - t:.0f}s)")
    for i, flags in enumerate(args.cli_row):
        t = time.time()
        out = Path(args.prebuilt) if args.prebuilt else work / f"row{i}"
        rc, text = (0, "") if args.prebuilt else build(model_dir, flags, out, args)
        rec = measure_row(args, model_dir, flags, out, rc, text, batches, flt)
        rec["seconds"] = round(time.time() - t)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"row {flags!r}: {json.dumps({k: v for k, v in rec.items() if k != 'gate'})}")
        log(f"  {rec['gate']}")
        if not args.prebuilt:
            shutil.rmtree(out, ignore_errors=True)


def measure_row(args, model_dir, flags, out: Path, rc: int, text: str, batches, flt) -> dict:
    """One row's record: the build's refusal, or its checkpoint's perplexity and top-1 agreement."""
    rec = {"model": Path(model_dir).name, "flags": flags, "float_ppl": flt["ppl"],
           "tokens": flt["tokens"], "windows": sum(b.shape[0] for b in batches),
           "code": args.code_label, "date": time.strftime("%Y-%m-%d"),
           "calib": f"{args.calib_size} x {args.calib_seq_len}"}
    gate = [ln for ln in text.splitlines() if ln.startswith("quality gate")]
    rec["gate"] = gate[-1] if gate else None
    if rc != 0:
        rec["refused"] = (text.strip().splitlines() or ["(no output)"])[-1]
        return rec
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    q = cfg.get("quantization") or {}
    rec.update(quant_algo=q.get("quant_algo"), kv=q.get("kv_cache_quant_algo"),
               dtype=cfg.get("dtype"), tp=cfg["mapping"]["tp_size"])
    rec.update(checkpoint_side(out / "checkpoint", batches, flt))
    return rec


def table(results: Path, model: str | None = None) -> str:
    """The markdown table of a results file's rows (of ``model`` only, when given; a later row with
    the same flags and code replaces an earlier one)."""
    rows: dict = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if model is None or r["model"] == model:
            rows[(r["flags"], r["code"])] = r
    if not rows:
        return "(no rows)"
    first = next(iter(rows.values()))
    lines = [f"Float model (HF, float32 compute): perplexity **{first['float_ppl']:.3f}** over "
             f"{first['tokens']} scored tokens ({first['windows']} windows).", "",
             "| build_engine flags | quant_algo / KV | dtype, tp | perplexity | ratio to float | "
             "top-1 agreement | code | build + measure s |",
             "|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows.values():
        flags = f"`{r['flags']}`" if r["flags"] else "(float)"
        if "refused" in r:
            lines.append(f"| {flags} | refused: {r['refused']} | | | | | {r['code']} | |")
            continue
        lines.append(f"| {flags} | {r['quant_algo'] or 'none'} / {r['kv'] or '–'} | {r['dtype']}, "
                     f"{r['tp']} | {r['ppl']:.3f} | {r['ratio']:.4f} ({100 * (r['ratio'] - 1):+.2f} %) "
                     f"| {100 * r['top1']:.1f} % | {r['code']} | {r['seconds']} |")
    return "\n".join(lines)


def render(args, write_block) -> int:
    text = table(Path(args.table_from), args.table_model)
    print(text)
    if args.write_md:
        name = args.md_block
        write_block(args.write_md, f"<!-- quality-{name}:begin -->", f"<!-- quality-{name}:end -->", text)
    return 0
