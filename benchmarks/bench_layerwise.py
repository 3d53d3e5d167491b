"""Layer-wise calibration at real shapes: peak RSS flat in depth, the memory plan against measured
peaks, and the whole-model path side by side where it fits.

1. Writes random HF Llama checkpoints of 8B layer shapes (4 and 16 layers) and 7B layer shapes
   (32 layers, 13.5 GB), vocabulary 49152 with SmolLM2-135M's tokenizer copied in (so the real
   calibration text tokenizes), fp16, with ``bench_convert.write_model`` (never held in memory).
2. Runs ``python -m builders --checkpoint-only --calib-device cpu --calib-size 4 --calib-seq-len
   64`` with each format under ``/usr/bin/time -v``: wall time, peak RSS, the memory plan it
   printed (its largest host figure), build.json's stage timings (input capture, layers,
   sharding, checkpoint). Every row starts warm: the model's files are read into the page cache
   first.
3. The whole-model path (``quantize.calibrate.calibrate`` loading the model with from_pretrained in
   fp32, then ``convert_checkpoint(calibrated_model=...)``) for the same command where it fits.
4. Bare forward passes: the float model's forward over the same batches, timed alone (the floor
   for calibration time), where the fp32 model fits.
5. ``:ckpt`` rows: the layer-wise conversion alone (``convert_checkpoint`` with its calibration
   store, no quality gate) with the memory plan the CLI prints for it.
6. ``:pt`` rows: ``--target pytorch``'s unified checkpoint alone (``write_unified_checkpoint``
   with a layer-wise calibration store: calibration + writing, no quality gate, no Triton
   repository), with the memory plan the CLI prints for it.

Formats: ``sqp`` is ``--smoothquant``'s default (TensorRT-LLM's plugin recipe), ``sqpa`` the same
with ``--smoothquant auto``, ``sq`` modelopt's SmoothQuant (``--sq-recipe modelopt``), ``fp8``,
``awq``, ``fp8kv`` (``--fp8 --kv-cache-dtype fp8``).

    python benchmarks/bench_layerwise.py                       # everything (~30-40 min on 2 cores)
    python benchmarks/bench_layerwise.py --rows 8b:4:sqp,8b:16:sqp --write-md BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_convert as bc  # noqa: E402
from bench_report import write_md  # noqa: E402

bc.PRESETS["8b-smol"] = dict(bc.PRESETS["8b"], vocab=49152)
bc.PRESETS["7b-smol"] = dict(bc.PRESETS["7b"], vocab=49152)
bc.PRESETS["1b-smol"] = dict(bc.PRESETS["1b"], vocab=49152)
#: row formats: sqp = --smoothquant's default (TensorRT-LLM's plugin recipe, per channel / per
#: token, alpha 0.75), sq = modelopt's SmoothQuant recipe
FLAGS = {"sqp": ["--smoothquant"], "sqpa": ["--smoothquant", "auto"],
         "sq": ["--smoothquant", "--sq-recipe", "modelopt"], "fp8": ["--fp8"], "awq": ["--awq"],
         "fp8kv": ["--fp8", "--kv-cache-dtype", "fp8"]}
ALGOS = {"sqp": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "sqpa": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
         "sq": "W8A8_SQ_PER_CHANNEL", "fp8": "FP8", "awq": "W4A16_AWQ", "fp8kv": "FP8"}
KVS = {"fp8kv": "fp8"}  # --kv-cache-dtype of a row format
ALPHAS = {"sqpa": "auto"}  # sqpa: --smoothquant auto (alpha searched per layer)
DEFAULT_ROWS = ("8b:4:sqp,8b:16:sqp,8b:4:sq,8b:4:fp8,8b:16:fp8,8b:4:awq,8b:16:awq,7b:32:sqp,"
                "8b:4:sqp:whole,8b:4:sqp:bare")
MARK_BEGIN, MARK_END = "<!-- layerwise:begin -->", "<!-- layerwise:end -->"

WHOLE = """
import sys, time, json; sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
from pathlib import Path
from convert_helper import convert_checkpoint  # the whole-model reference path is test-only
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from quantize.sq_reference import calibrate_plugin
spec = QuantSpec.create({algo!r}, smoothquant_alpha={alpha!r}, calib_size=4, calib_seq_len=64)
t0 = time.perf_counter()
if spec.is_sq_plugin:
    model = calibrate_plugin({model!r}, spec, progress=False)  # loads on "auto": CPU here
else:
    model = calibrate({model!r}, spec, device="cpu", progress=False)
t1 = time.perf_counter()
convert_checkpoint({model!r}, Path({out!r}), progress=False, quant=spec, calibrated_model=model)
print("whole-model calibration: %.1fs, checkpoint %.1fs" % (t1 - t0, time.perf_counter() - t1))
"""

#: the layer-wise conversion alone (calibration + sharding, no quality gate), with the memory plan
#: the CLI would print for it
CKPT = """
import sys, time; sys.path.insert(0, {repo!r})
from pathlib import Path
from model.source import ModelSource
from pipeline.checkpoint import convert_checkpoint, plan_layout
from quantize import memory
from quantize.formats import QuantSpec
from quantize.run import CalibrationRun
spec = QuantSpec.create({algo!r}, smoothquant_alpha={alpha!r}, calib_size=4, calib_seq_len=64)
model = ModelSource.open({model!r})
layout = plan_layout(model, quant=spec)
print("memory plan: " + memory.describe(memory.plan(model.shape, spec, tp=1, pp=1, device="cpu")))
t0 = time.perf_counter()
done = convert_checkpoint(model, Path({out!r}) / "checkpoint", layout, spec, progress=False,
                          calibration=CalibrationRun(store=Path({out!r}) / "calibration",
                                                     device="cpu"))
print("layer-wise checkpoint: %.1fs (%s)" % (time.perf_counter() - t0, done.timings))
"""

#: --target pytorch's unified checkpoint alone (layer-wise calibration + writing, no quality gate),
#: with the memory plan the CLI would print for it
PT = """
import sys, time; sys.path.insert(0, {repo!r})
from pathlib import Path
from model.source import ModelSource
from quantize import memory
from quantize.formats import QuantSpec
from quantize.run import CalibrationRun
from quantize.unified import write_unified_checkpoint
spec = QuantSpec.create({algo!r}, kv_cache_dtype={kv!r}, smoothquant_alpha={alpha!r},
                        calib_size=4, calib_seq_len=64)
model = ModelSource.open({model!r})
assert spec.format.unified_layerwise(spec)
print("memory plan: " + memory.describe(memory.plan(model.shape, spec, tp=1, pp=1, device="cpu",
                                                    unified=True)))
t0, timings = time.perf_counter(), {{}}
write_unified_checkpoint({model!r}, Path({out!r}) / "hf_quantized", spec, progress=False,
                         timings=timings, calibration=CalibrationRun(
                             store=Path({out!r}) / "calibration", device="cpu"))
print("layer-wise checkpoint: %.1fs (%s)" % (time.perf_counter() - t0, timings))
"""

BARE = """
import sys, time, torch; sys.path.insert(0, {repo!r})
from transformers import AutoModelForCausalLM, AutoTokenizer
from quantize.formats import QuantSpec
from quantize.layerwise import calib_batches
spec = QuantSpec.create("W8A8_SQ_PER_CHANNEL", calib_size=4, calib_seq_len=64)
t0 = time.perf_counter()  # from the tokenizer on, as the calibration stage of the other rows
batches = calib_batches(spec, spec.read_calib_text(), AutoTokenizer.from_pretrained({model!r}))
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
t1 = time.perf_counter()
with torch.no_grad():
    for b in batches:
        model(input_ids=b, use_cache=False)
print("bare load: %.2fs" % (t1 - t0))
print("bare forward: %.2fs" % (time.perf_counter() - t1))
"""

#: the layer-wise path's own floor: the same LayerRunner (calibration ids embedded, then each layer
#: read from the safetensors, cast to float32 and run on the batches), nothing calibrated or stored
LWBARE = """
import sys, time, torch; sys.path.insert(0, {repo!r})
from convert.source import SourceCheckpoint
from model.tokenizer import load_tokenizer
from quantize.formats import QuantSpec
from quantize.layerwise import LayerRunner, calib_batches
spec = QuantSpec.create("W8A8_SQ_PER_CHANNEL", calib_size=4, calib_seq_len=64)
t0 = time.perf_counter()
batches = calib_batches(spec, spec.read_calib_text(), load_tokenizer({model!r}))
runner = LayerRunner({model!r}, SourceCheckpoint({model!r}), batches, torch.device("cpu"),
                     modelopt=False)
t1 = time.perf_counter()
h = runner.first_inputs
for i in range(len(runner)):
    layer = runner.materialise(i)
    h = runner.forward(layer, i, h)
    del layer
print("layer-wise bare: inputs %.2fs, layers %.2fs" % (t1 - t0, time.perf_counter() - t1))
"""


def make_model(work: Path, preset: str, layers: int, tokenizer_from: Path) -> Path:
    d = work / f"hf-{preset}-{layers}l"
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        bc.write_model(d, f"{preset}-smol", layers, "float16", 2.0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, d / name)
    return d


def warm(model: Path) -> None:
    """Read the model's files into the page cache before a row, so that every row starts warm
    (an earlier row or another benchmark may have evicted them; a cold row measures the disk)."""
    buf = bytearray(8 * 2**20)
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def plan_peak(text: str, stages: tuple[str, ...] | None = None) -> float | None:
    """The largest host figure of the memory plan the run printed (of ``stages`` only, if given:
    a :ckpt row runs no verification)."""
    m = re.search(r"^memory plan: (.*)$", text, re.M)
    if not m:
        return None
    return max(float(x) for name, x in re.findall(r"(\w+): host ([0-9.]+) GB", m.group(1))
               if stages is None or name in stages)


def run_row(work: Path, row: str, smol: Path) -> dict:
    preset, layers, fmt, *mode = row.split(":")
    mode = mode[0] if mode else "layerwise"
    model = make_model(work, preset, int(layers), smol)
    warm(model)
    out = work / f"out-{row.replace(':', '_')}"  # per row: invocations may run side by side
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"{row.replace(':', '_')}.log"
    algo = ALGOS[fmt]
    if mode == "ckpt":
        cmd = [sys.executable, "-c", CKPT.format(repo=str(REPO), algo=algo, model=str(model),
                                                 out=str(out), alpha=ALPHAS.get(fmt))]
    elif mode == "pt":
        cmd = [sys.executable, "-c", PT.format(repo=str(REPO), algo=algo, kv=KVS.get(fmt),
                                               model=str(model), out=str(out),
                                               alpha=ALPHAS.get(fmt))]
    elif mode == "whole":
        cmd = [sys.executable, "-c", WHOLE.format(repo=str(REPO), algo=algo, alpha=ALPHAS.get(fmt),
                                                  model=str(model),
                                                  out=str(out / "checkpoint"))]
    elif mode == "bare":
        cmd = [sys.executable, "-c", BARE.format(repo=str(REPO), model=str(model))]
    elif mode == "lwbare":
        cmd = [sys.executable, "-c", LWBARE.format(repo=str(REPO), model=str(model))]
    else:
        cmd = [sys.executable, "-m", "builders", "--model", str(model), "--output", str(out),
               "--checkpoint-only", "--no-progress", "--calib-device", "cpu", "--calib-size", "4",
               "--calib-seq-len", "64", *FLAGS[fmt]]
    wall, rss, tree, rc, text = bc.timed(cmd, log)
    res = {"row": row, "preset": preset, "layers": int(layers), "format": fmt, "mode": mode,
           "rc": rc, "wall_s": round(wall, 1), "peak_rss_gb": round(rss / 1024, 2),
           "model_gb": round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9, 2)}
    if rc != 0:
        res["error"] = text.split("\tCommand being timed")[0].strip().splitlines()[-1:]
    res["plan_host_gb"] = plan_peak(text, ("calibration", "checkpoint")
                                    if mode in ("ckpt", "pt") else None)
    bj = out / "build.json"
    if bj.is_file():
        res["stages"] = json.loads(bj.read_text()).get("stage_timings_s", {})
    for pat, key in ((r"whole-model calibration: ([0-9.]+)s", "whole_calibration_s"),
                     (r"bare load: ([0-9.]+)s", "bare_load_s"),
                     (r"bare forward: ([0-9.]+)s", "bare_forward_s"),
                     (r"layer-wise bare: inputs ([0-9.]+)s", "lwbare_inputs_s"),
                     (r"layer-wise bare: .*layers ([0-9.]+)s", "lwbare_layers_s")):
        m = re.search(pat, text)
        if m:
            res[key] = float(m.group(1))
    m = re.search(r"layer-wise checkpoint: [0-9.]+s \((\{.*\})\)", text)
    if m and "stages" not in res:  # :ckpt rows print convert_checkpoint's stage timings
        res["stages"] = ast.literal_eval(m.group(1))
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(res), flush=True)
    return res


def _calibration_cell(r: dict) -> str:
    st = r.get("stages", {})
    if st:
        return (f"{st.get('calibration', 0):.1f} s ({st.get('calibration_inputs', 0):.1f} + "
                f"{st.get('calibration_layers', 0):.1f})")
    if "whole_calibration_s" in r:
        return f"{r['whole_calibration_s']:.1f} s"
    if "bare_forward_s" in r:
        return (f"bare: load {r.get('bare_load_s', 0):.1f} s + forward {r['bare_forward_s']:.1f} s")
    if "lwbare_layers_s" in r:
        return (f"layer-wise bare: {r['lwbare_inputs_s'] + r['lwbare_layers_s']:.1f} s "
                f"({r['lwbare_inputs_s']:.1f} + {r['lwbare_layers_s']:.1f})")
    return ""


def _floor_s(r: dict) -> float | None:
    """A bare row's forward passes with their weight loading, in seconds (None: not measured)."""
    if "lwbare_layers_s" in r:
        return r["lwbare_inputs_s"] + r["lwbare_layers_s"]
    if "bare_load_s" in r:
        return r["bare_load_s"] + r["bare_forward_s"]
    return None


def time_summary(results: list[dict]) -> list[str]:
    """Per :ckpt row with a bare row of the same model, the ratio the issue asks for: calibration
    time against the bare forward passes with their weight loading (layer-wise and whole)."""
    lines = []
    by = {(r["preset"], r["layers"], r["format"], r["mode"]): r for r in results if r["rc"] == 0}
    for (preset, layers, fmt, mode), r in sorted(by.items()):
        cal = r.get("stages", {}).get("calibration") if mode in ("ckpt", "pt") else None
        for bmode in ("lwbare", "bare") if cal else ():
            b = by.get((preset, layers, "sqp", bmode))
            floor = _floor_s(b) if b else None
            if floor:
                lines.append(f"- {preset}-shaped {layers} layers {fmt}: calibration {cal:.1f} s = "
                             f"{cal / floor:.2f}x the {bmode} forward passes with their weight "
                             f"loading ({floor:.1f} s); whole process {r['wall_s']:.1f} s vs "
                             f"{b['wall_s']:.1f} s = {r['wall_s'] / b['wall_s']:.2f}x")
    return lines


def round_ratios(rounds: list[list[dict]]) -> list[str]:
    """Per :ckpt row with a :lwbare row of the same model, its calibration time over the floor's
    in each round (rows measured minutes apart on a shared VM move by +-20 %: a ratio within one
    round compares like with like)."""
    lines = ["Calibration / layer-wise floor, per round (interleaved):"]
    for r in rounds[0]:
        if r["mode"] != "ckpt" or r["rc"] != 0:
            continue
        per = []
        for rnd in rounds:
            by = {(x["preset"], x["layers"], x["mode"], x["format"] if x["mode"] == "ckpt" else None): x
                  for x in rnd if x["rc"] == 0}  # one floor per model, a ckpt row per format
            c = by.get((r["preset"], r["layers"], "ckpt", r["format"]))
            f = by.get((r["preset"], r["layers"], "lwbare", None))
            if c and f and "stages" in c and _floor_s(f):
                per.append(c["stages"]["calibration"] / _floor_s(f))
        if per:
            med = sorted(per)[len(per) // 2]
            lines.append(f"- {r['preset']}-shaped {r['layers']} layers {r['format']}: "
                         f"{', '.join(f'{x:.2f}' for x in per)} (median {med:.2f})")
    return lines


def table(results: list[dict], load: str) -> str:
    lines = [f"Machine load during the run: {load}", "",
             "| model | layers | format | path | peak RSS | plan (host) | plan / peak | calibration "
             "(inputs + layers) | whole run |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        cal = _calibration_cell(r)
        plan = r.get("plan_host_gb")
        ratio = f"{plan / r['peak_rss_gb']:.2f}" if plan and r["rc"] == 0 else ""
        status = "" if r["rc"] == 0 else f" (failed: {r.get('error')})"
        lines.append(f"| {r['preset']}-shaped, {r['model_gb']} GB | {r['layers']} | {r['format']} | "
                     f"{r['mode']} | {r['peak_rss_gb']:.2f} GB{status} | "
                     f"{f'{plan:.2f} GB' if plan else ''} | {ratio} | {cal} | {r['wall_s']:.0f} s |")
    summary = time_summary(results)
    if summary:
        lines += ["", "Time against the bare forward passes (goal: within 1.2x):", *summary]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_layerwise")
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help="comma list of preset:layers:format[:whole|:bare|:lwbare|:ckpt|:pt] (format: "
                         "sqp, sqpa, sq, fp8, awq, fp8kv)")
    ap.add_argument("--write-md", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the rows this many times, interleaved; the table keeps the last "
                         "round, and the calibration / layer-wise floor ratio is given per round")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--append", action="store_true",
                    help="add these rows to the table of earlier runs (WORK/results.json)")
    a = ap.parse_args(argv)
    from examples.smollm2 import prepare_smollm2

    smol = prepare_smollm2()
    a.work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    saved = a.work / "results.json"
    old = json.loads(saved.read_text()) if a.append and saved.is_file() else {"rows": [], "load": []}
    rounds = [[run_row(a.work, row, smol) for row in a.rows.split(",")] for _ in range(a.rounds)]
    results = rounds[-1]
    rows = {r["row"]: r for r in old["rows"]}
    rows.update({r["row"]: r for r in results})
    loads = old["load"] + [f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f}"]
    saved.write_text(json.dumps({"rows": list(rows.values()), "load": loads}, indent=1))
    load = f"load average (start -> end of each run of the script) {', '.join(loads)}; 2 cores"
    md = table(list(rows.values()), load)
    if a.rounds > 1:
        md += "\n\n" + "\n".join(round_ratios(rounds))
    print(md)
    if a.write_md:
        write_md(a.write_md, md, (MARK_BEGIN, MARK_END))
    if not a.keep_models:
        for d in a.work.glob("hf-*"):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
