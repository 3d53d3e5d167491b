"""``--target pytorch --fp8`` at 8B layer shapes: peak RSS flat in depth, with the quality gate.

1. Writes random HF Llama checkpoints of 8B layer shapes (vocabulary 49152, SmolLM2-135M's
   tokenizer copied in) at each ``--layers`` depth, fp16 (``bench_layerwise.make_model``).
2. ``full`` rows: ``python -m builders --model M --target pytorch --fp8 --calib-device cpu
   --calib-size 4 --calib-seq-len 64 --triton-target none`` under ``/usr/bin/time -v``: peak RSS
   of the whole run (layer-wise calibration, the unified checkpoint, the quality gate on it),
   wall time and build.json's stage timings.
3. ``gate`` rows: the quality gate alone (``builders.checks.quality_gate``, what the run calls)
   in its own process on that run's unified checkpoint: the readers' own peak. ``reader`` rows:
   the same measurement (``verify.quality_gate.measure``) on the gate's first 64 tokens only, a
   sixteenth of its compute (for a loaded machine); ``ref`` rows: only its checkpoint side
   (``verify.model.ReferenceModel`` opened lazily, as the gate opens it) on those 64 tokens.

``--baseline DIR``: the same rows also run with another tree of this repository (e.g.
``git archive <rev> | tar -x -C DIR``), the model and its unified checkpoint the same, for a
before / after table.

    python benchmarks/bench_pytorch_target.py --layers 4,16 --write-md BENCHMARKS.md
    python benchmarks/bench_pytorch_target.py --baseline /tmp/base --write-md BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_layerwise as bl  # noqa: E402
from bench_report import write_md  # noqa: E402
from measure import timed  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- pytorch-target:begin -->", "<!-- pytorch-target:end -->"
FLAGS = ["--target", "pytorch", "--fp8", "--calib-device", "cpu", "--calib-size", "4",
         "--calib-seq-len", "64", "--triton-target", "none", "--no-progress"]

GATE = """
import sys, time; sys.path.insert(0, {repo!r})
from pathlib import Path
from builders.checks import quality_gate
from model.tokenizer import load_tokenizer
from quantize.formats import QuantSpec
spec = QuantSpec.create("FP8", calib_size=4, calib_seq_len=64)
t0 = time.perf_counter()
quality_gate(Path({ckpt!r}), Path({model!r}), spec, load_tokenizer(Path({model!r})))
print("gate: %.1fs" % (time.perf_counter() - t0))
"""

#: the gate's own measurement (verify.quality_gate.measure: the float model, then the checkpoint,
#: layer by layer) on its first 64 held-back tokens only: the readers' memory at a sixteenth of
#: the gate's compute (weights dominate the peak; 64 tokens of activations are small)
READER = """
import sys, time; sys.path.insert(0, {repo!r})
from pathlib import Path
from model.tokenizer import load_tokenizer
from quantize.calibrate import held_back_ids
from quantize.formats import QuantSpec
from verify.quality_gate import GATE_TOKENS, measure
spec = QuantSpec.create("FP8", calib_size=4, calib_seq_len=64)
ids, _ = held_back_ids(spec.read_calib_text(), load_tokenizer(Path({model!r})), spec, GATE_TOKENS)
t0 = time.perf_counter()
r = measure(Path({ckpt!r}), Path({model!r}), ids[:64])
print("quality gate (64 tokens): perplexity %.4f vs float %.4f" % (r["ppl"], r["float_ppl"]))
print("reader: %.1fs" % (time.perf_counter() - t0))
"""
#: the checkpoint's side of the gate alone: the reference reader opened as the gate opens it
#: (lazy), 64 held-back tokens through it
REF = """
import sys, time; sys.path.insert(0, {repo!r})
from pathlib import Path
import torch
from model.tokenizer import load_tokenizer
from quantize.calibrate import held_back_ids
from quantize.formats import QuantSpec
from verify.model import ReferenceModel
from verify.quality_gate import GATE_TOKENS
spec = QuantSpec.create("FP8", calib_size=4, calib_seq_len=64)
ids, _ = held_back_ids(spec.read_calib_text(), load_tokenizer(Path({model!r})), spec, GATE_TOKENS)
t0 = time.perf_counter()
(logits,) = ReferenceModel(Path({ckpt!r}), lazy=True).forward_windows([torch.tensor([ids[:64]])])
print("reader: %.1fs" % (time.perf_counter() - t0))
"""
MODES = {"full": "whole run", "gate": "quality gate alone", "reader": "gate on 64 tokens alone",
         "ref": "its checkpoint reader alone, 64 tokens",
         "write": "whole run stopped in its gate: calibration + writing"}  # a full row cut short
SCRIPTS = {"gate": GATE, "reader": READER, "ref": REF}


def run(tree: Path, label: str, mode: str, model: Path, out: Path, log: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    if mode == "full":
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "builders", "--model", str(model), "--output", str(out), *FLAGS]
    else:
        cmd = [sys.executable, "-c", SCRIPTS[mode].format(repo=str(tree), ckpt=str(out / "hf_quantized"),
                                                   model=str(model))]
    bl.warm(model)
    wall, rss, _, rc, text = timed(cmd, log, env=env, cwd=tree)
    res = {"tree": label, "mode": mode, "rc": rc, "wall_s": round(wall, 1),
           "peak_rss_gb": round(rss / 1024, 2)}
    if rc != 0:
        res["error"] = text.split("\tCommand being timed")[0].strip().splitlines()[-1:]
    m = re.search(r"quality gate \([^)]*\): perplexity ([0-9.]+) vs float ([0-9.]+)", text)
    s = re.search(r"^(?:gate|reader): ([0-9.]+)s$", text, re.M)
    if s:
        res["gate_s"] = float(s.group(1))
    if m:
        res["ppl"], res["float_ppl"] = float(m.group(1)), float(m.group(2))
    bj = out / "build.json"
    if mode == "full" and bj.is_file():
        res["stages"] = json.loads(bj.read_text()).get("stage_timings_s", {})
    return res


def table(rows: list[dict], load: str) -> str:
    lines = [f"Machine load: {load}", "",
             "| model | layers | tree | what | peak RSS | wall | gate (or reader) s | gate perplexity "
             "(float) |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        st = r.get("stages", {})
        gate = st.get("quality_gate", r.get("gate_s"))
        status = "" if r["rc"] == 0 else f" (failed: {r.get('error')})"
        ppl = f"{r['ppl']:.4f} ({r['float_ppl']:.4f})" if "ppl" in r else ""
        lines.append(f"| 8b-shaped, {r['model_gb']} GB | {r['layers']} | {r['tree']} | "
                     f"{MODES[r['mode']]} | "
                     f"{r['peak_rss_gb']:.2f} GB{status} | {r['wall_s']:.0f} s | "
                     f"{f'{gate:.1f}' if gate is not None else ''} | {ppl} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_pytorch_target")
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--modes", default="full,gate",
                    help="full (the CLI run), gate (the gate alone on its checkpoint), reader (the "
                         "gate's measurement on 64 tokens alone), ref (its checkpoint side alone)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep WORK/out-* (the unified checkpoints): a later run's gate/reader rows "
                         "without a full row read them")
    ap.add_argument("--baseline", type=Path, help="another tree of this repository, run alike")
    ap.add_argument("--baseline-modes", help="the baseline's modes (default: --modes)")
    ap.add_argument("--write-md", type=Path)
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--append", action="store_true",
                    help="add these rows to the table of earlier runs (WORK/results.json)")
    a = ap.parse_args(argv)
    from examples.smollm2 import prepare_smollm2

    smol = prepare_smollm2()
    a.work.mkdir(parents=True, exist_ok=True)
    trees = [(REPO, "this tree")] + ([(a.baseline.resolve(), "baseline")] if a.baseline else [])
    load0, rows = os.getloadavg(), []
    for layers in [int(x) for x in a.layers.split(",")]:
        model = bl.make_model(a.work, "8b", layers, smol)
        gb = round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9, 2)
        outs = []
        for tree, label in trees:
            out = a.work / f"out-{layers}l-{label.replace(' ', '_')}"
            modes = a.baseline_modes or a.modes if tree != REPO else a.modes
            for mode in modes.split(","):
                # the gate alone reads this tree's unified checkpoint when its own run made none
                ckpt = out if mode == "full" or (out / "hf_quantized").is_dir() else outs[0]
                r = run(tree, label, mode, model, ckpt, a.work / f"{layers}l-{label[:4]}-{mode}.log")
                r.update(layers=layers, model_gb=gb)
                print(json.dumps(r), flush=True)
                rows.append(r)
            outs.append(out)
        for out in outs if not a.keep_outputs else ():
            shutil.rmtree(out, ignore_errors=True)
        if not a.keep_models:
            shutil.rmtree(model, ignore_errors=True)
    saved = a.work / "results.json"
    old = json.loads(saved.read_text()) if a.append and saved.is_file() else {"rows": [], "load": []}
    loads = old["load"] + [f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f}"]
    rows = old["rows"] + rows
    saved.write_text(json.dumps({"rows": rows, "load": loads}, indent=1))
    md = table(rows, f"load average (start -> end of each run of the script) {', '.join(loads)}; "
                     f"2 cores")
    print(md)
    if a.write_md:
        write_md(a.write_md, md, (MARK_BEGIN, MARK_END))
    return 0


if __name__ == "__main__":
    sys.exit(main())
