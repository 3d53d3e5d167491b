"""Conversion benchmark at real Llama shapes: ours vs ``cp`` vs nvidia-modelopt's export.

1. Writes a Hugging Face Llama checkpoint of real layer shapes (7B, 8B, 70B layer shapes, fewer
   layers) with random weights (``synth_model.py``; never held in memory).
2. Measures, in one run and side by side, each as a subprocess under ``/usr/bin/time -v`` (wall
   time, peak RSS of the largest process) plus a /proc sampler (peak RSS summed over the process
   tree, which matters for ``--workers``):

   - ``cp -r`` of the model dir (the floor on this disk), and ``cp -r`` followed by an fsync of
     every copied file (``sync FILE...``), since our converter fsyncs each file it writes;
   - ``build_engine --checkpoint-only --no-progress`` in fp16 at each ``--tp`` (the whole
     command, as a user runs it: imports, conversion, build.json with its BLAKE3 digests of
     inputs and outputs); its "checkpoint ... in Xs" line gives the conversion stage;
   - ``convert_checkpoint()`` alone, timed after its imports (the part convert/ owns);
   - the same two with ``BUILD_ENGINE_DIRECT_IO=0`` (through the page cache; by default every
     rank file is written with O_DIRECT and hashed while written);
   - int8 weight-only (``--int8-weight-only``) if the CLI has it;
   - ``--compare-tree DIR``: the same command from another checkout (before/after);
   - nvidia-modelopt's ``export_tensorrt_llm_checkpoint`` (time includes its imports and loading
     the model with transformers, as a user pays it);
   - cp+fsync and ours with the input evicted from the page cache first (cold input).

   Cache state: the source files are read right before every warm run so it finds the input in
   the page cache; cold runs evict it first (``posix_fadvise(DONTNEED)`` per file: the global
   cache cannot be dropped without root, but a file's clean pages can). ``sync`` runs before each
   timed run so dirty pages of an earlier run are not charged to the next one. Outputs are
   removed after each run. Cases are interleaved round by round (``--repeat``), medians reported.
3. Flatness and size: our whole command and cp+fsync at two layer counts (default 8 vs 32),
   ``--repeat`` rounds each: peak RSS flat, and the ratio to cp+fsync at the larger size.

``--done-when``: only the rows of the issue's targets, in one run (7B shapes, fp16 tp 2 at 8 layers:
the whole command, ``convert_checkpoint()``, cp, cp+fsync, modelopt's export, cold input; 32 layers
(13.5 GB) vs cp+fsync; peak RSS; 3 rounds, medians); other flags still override its choices.
Timings (``measure.py``), the table and the targets (``bench_report.py``) have their own files.

Prints a markdown table; ``--write-md BENCHMARKS.md`` also puts it between the markers
``<!-- bench:begin -->`` / ``<!-- bench:end -->`` of that file.

    python benchmarks/bench_convert.py --done-when        # the issue's target rows, 3 rounds
    python benchmarks/bench_convert.py                    # 7B shape, 8 layers; flat 8 vs 32
    python benchmarks/bench_convert.py --quick            # minutes: 7B shape, 2 layers, tp 2
    python benchmarks/bench_convert.py --preset 8b --layers 4 --tp 2,8
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import fmt_table, flat_table, machine_info, targets, write_md  # noqa: E402
from measure import REPO, Result, evict, run_case, timed, warm  # noqa: E402,F401 (timed: bench_moe)
from synth_model import PRESETS, hf_tensors, write_model, write_shards  # noqa: E402,F401 (re-exported)

DONE_WHEN = dict(preset="7b", layers=8, tp="2", target_tp=2, modelopt_tp="2", ab_direct=False,
                 cold=True, flat="8,32", repeat=3, workers=0)


def ours_cmd(model: Path, out: Path, tp: int, extra=()):
    return [sys.executable, "-m", "builders", "--model", str(model), "--output", str(out),
            "--tp", str(tp), "--dtype", "float16", "--checkpoint-only", "--no-progress", *extra]


LIB_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[4])
from convert.convert import convert_checkpoint
from model.config import read_hf_config
read_hf_config(sys.argv[1])  # imports before the clock starts
t = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), dtype="float16", force=True,
                   progress=False)
print(f"convert_checkpoint: {time.perf_counter() - t:.3f}s")
"""

MODELOPT_SCRIPT = """
import time
t0 = time.perf_counter()
import sys, torch
from transformers import AutoModelForCausalLM
from modelopt.torch.export import export_tensorrt_llm_checkpoint
src, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
t2 = time.perf_counter()
# transformers >= 5 keeps rope theta in rope_parameters only; modelopt 0.47 reads rope_theta.
model.config.rope_theta = model.config.rope_parameters["rope_theta"]
export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.float16, export_dir=out,
                               inference_tensor_parallel=tp)
t3 = time.perf_counter()
print(f"modelopt phases: imports {t1 - t0:.1f}s, load {t2 - t1:.1f}s, export {t3 - t2:.1f}s")
"""


def cli_has(flag: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "builders", "--help"], capture_output=True,
                       text=True, cwd=REPO)
    return flag in r.stdout


def same_checkpoint(a: Path, b: Path, world: int) -> str:
    """'yes' if every rank file holds the same tensors (names, dtypes, values), else why not."""
    import torch
    from safetensors import safe_open

    for r in range(world):
        with safe_open(str(a / f"rank{r}.safetensors"), "pt") as fa, \
                safe_open(str(b / f"rank{r}.safetensors"), "pt") as fb:
            if sorted(fa.keys()) != sorted(fb.keys()):
                return f"no: rank {r} tensor names differ"
            for k in fb.keys():
                x, y = fa.get_tensor(k), fb.get_tensor(k)
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                    return f"no: rank {r} {k} differs"
    return "yes"



def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--done-when", action="store_true",
                    help="the issue's target rows only (see the module docstring); other flags "
                         "override its choices, e.g. --layers 2 --flat 2,3 --repeat 1 to try it")
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="dtype of the written HF checkpoint (conversion is always to fp16)")
    ap.add_argument("--tp", help="our fp16 runs, comma-separated tp sizes (default 1,2,4)")
    ap.add_argument("--target-tp", type=int, help="tp of the target comparisons (default 2)")
    ap.add_argument("--modelopt-tp",
                    help="tp sizes for modelopt (default: --target-tp); 'none' skips modelopt")
    ap.add_argument("--workers", type=int,
                    help="also run ours at --target-tp with this many --workers (0: skip)")
    ap.add_argument("--compare-tree", type=Path,
                    help="also time `python -m builders` of another checkout of this project "
                         "(e.g. `git archive <rev> | tar -x -C DIR`) at --target-tp: before/after")
    ap.add_argument("--no-ab-direct", dest="ab_direct", action="store_false", default=None,
                    help="skip the runs with BUILD_ENGINE_DIRECT_IO=0 (page cache, no O_DIRECT)")
    ap.add_argument("--no-cold", dest="cold", action="store_false", default=None,
                    help="skip the cold-input runs (input evicted with posix_fadvise DONTNEED)")
    ap.add_argument("--flat", help="layer counts for the RSS flatness check and the size ratio "
                                   "('none' skips it; default 8,32)")
    ap.add_argument("--flat-preset", default=None, help="preset of the flatness check "
                                                        "(default: --preset)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per case, interleaved (median wall; default 3, --quick 1)")
    ap.add_argument("--wo-flags", default="--int8-weight-only",
                    help="our int8 weight-only flags (skipped when the first is not in --help; "
                         "'none' skips the row)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="HF shard size")
    ap.add_argument("--workdir", type=Path, default=REPO.parent / "bench-tmp",
                    help="where models and outputs go (deleted afterwards unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: 2 layers, tp 2 only, flatness 2 vs 8 layers")
    ap.add_argument("--write-md", type=Path, help="put the result table into this markdown file")
    a = ap.parse_args(argv)
    defaults = dict(preset="7b", layers=None, tp="1,2,4", target_tp=2, modelopt_tp=None,
                    ab_direct=True, cold=True, flat="8,32", repeat=3, workers=0)
    if a.quick:
        defaults.update(layers=2, flat="2,8", repeat=1)
    if a.done_when:
        defaults.update(DONE_WHEN)
        if a.wo_flags == "--int8-weight-only":
            a.wo_flags = "none"  # not one of the targets
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick and a.tp == "1,2,4":
        a.tp = str(a.target_tp)
    a.layers = a.layers or PRESETS[a.preset]["layers"]
    a.tps = [int(x) for x in a.tp.split(",") if x]
    a.flats = [] if a.flat == "none" else [int(x) for x in a.flat.split(",")]
    a.mo_tps = [a.target_tp] if a.modelopt_tp is None else \
        ([] if a.modelopt_tp == "none" else [int(x) for x in a.modelopt_tp.split(",")])
    return a


def build_cases(a, model: Path, work: Path, logs: Path) -> dict:
    """Every timed case of the main table: (result, command, output dir, cwd, env, cold)."""
    tt = a.target_tp
    cp_dst = work / "cp-out"
    cp_files = " ".join(f"'{cp_dst / f.name}'" for f in sorted(model.iterdir()))
    cp_sync = ["sh", "-c", f"cp -r '{model}' '{cp_dst}' && sync {cp_files}"]
    lib_cmd = lambda out: [sys.executable, str(logs / "lib_convert.py"), str(model),  # noqa: E731
                           str(out / "checkpoint"), str(tt), str(REPO)]
    r = dict(cp=Result("cp -r (no fsync)"),
             cps=Result("cp -r + fsync each file", note="baseline of the targets"),
             ours={tp: Result(f"ours fp16 tp {tp}", note="whole `build_engine` command")
                   for tp in a.tps},
             lib=Result(f"ours fp16 tp {tt}: `convert_checkpoint()` only",
                        note="imports before the clock; no build.json"),
             mo={tp: Result(f"modelopt export tp {tp}", note="incl. imports and HF model load; "
                            "no fsync") for tp in a.mo_tps})
    cases = [(r["cp"], ["cp", "-r", str(model), str(cp_dst)], cp_dst, None, None, False),
             (r["cps"], cp_sync, cp_dst, None, None, False)]
    for tp, res in r["ours"].items():
        out = work / f"ours-tp{tp}"
        cases.append((res, ours_cmd(model, out, tp, ["--force"]), out, None, None, False))
    cases.append((r["lib"], lib_cmd(work / "ours-lib"), work / "ours-lib", None, None, False))
    extra = []
    if a.ab_direct:
        env = dict(os.environ, BUILD_ENGINE_DIRECT_IO="0")
        r["direct"] = Result(f"ours fp16 tp {tt}, BUILD_ENGINE_DIRECT_IO=0",
                             note="page-cache writes, build.json reads the outputs back "
                                  "(default: O_DIRECT, hashed while written)")
        r["direct_lib"] = Result(f"ours fp16 tp {tt}: `convert_checkpoint()` only, "
                                 f"BUILD_ENGINE_DIRECT_IO=0", note="page cache; imports before the clock")
        out = work / "ours-direct"
        cases += [(r["direct"], ours_cmd(model, out, tt, ["--force"]), out, None, env, False),
                  (r["direct_lib"], lib_cmd(work / "ours-lib-direct"), work / "ours-lib-direct",
                   None, env, False)]
        extra += [r["direct"], r["direct_lib"]]
    if a.compare_tree:
        res = Result(f"before: `{a.compare_tree}` fp16 tp {tt}",
                     note="the checkout given by --compare-tree")
        out = work / "ours-before"
        cases.append((res, ours_cmd(model, out, tt, ["--force"]), out, a.compare_tree, None, False))
        extra.append(res)
    wo_flags = [] if a.wo_flags == "none" else a.wo_flags.split()
    if wo_flags:
        res = Result(f"ours int8 weight-only tp {tt}")
        if cli_has(wo_flags[0]):
            out = work / "ours-wo"
            cases.append((res, ours_cmd(model, out, tt, ["--force", *wo_flags]), out, None, None,
                          False))
        else:
            res.note = f"not available yet (no {wo_flags[0]} in the CLI)"
        extra.append(res)
    if a.workers:
        res = Result(f"ours fp16 tp {tt} --workers {a.workers}")
        out = work / "ours-workers"
        cases.append((res, ours_cmd(model, out, tt, ["--force", "--workers", str(a.workers)]), out,
                      None, None, False))
        extra.append(res)
    for tp, res in r["mo"].items():
        out = work / f"modelopt-tp{tp}"
        cases.append((res, [sys.executable, str(logs / "modelopt_export.py"), str(model), str(out),
                            str(tp)], out, None, None, False))
    if a.cold:
        cold_cp = Result("cold input: cp -r + fsync each file",
                         note="input evicted from the page cache before the run")
        cold_ours = Result(f"cold input: ours fp16 tp {tt}",
                           note="input evicted from the page cache before the run")
        out = work / "ours-cold"
        cases += [(cold_cp, cp_sync, cp_dst, None, None, True),
                  (cold_ours, ours_cmd(model, out, tt, ["--force"]), out, None, None, True)]
    r["cases"] = cases
    r["rows"] = [r["cp"], r["cps"], *r["ours"].values(), r["lib"], *extra, *r["mo"].values()] + \
        ([cold_cp, cold_ours] if a.cold else [])
    return r


def run_rounds(a, r: dict, model: Path, work: Path, logs: Path) -> str:
    """The main cases, interleaved round by round; returns whether ours == modelopt's export."""
    equal = "not checked"
    for rep in range(a.repeat):
        for res, cmd, out, cwd, env, cold in r["cases"]:
            evict(model) if cold else warm(model)
            shutil.rmtree(out, ignore_errors=True)
            run_case(res, cmd, logs / f"{re.sub(r'[^a-z0-9]+', '_', res.label.lower())}.log",
                     env=env, cwd=cwd)
            tp = next((t for t, m in r["mo"].items() if m is res), None)
            if tp is not None and rep == 0 and tp in r["ours"]:
                mine = work / f"ours-tp{tp}-kept" / "checkpoint"
                if mine.exists() and out.exists():
                    equal = same_checkpoint(mine, out, tp)
                    print(f"# ours tp {tp} == modelopt tp {tp}: {equal}", flush=True)
                shutil.rmtree(mine.parent, ignore_errors=True)
            tp = next((t for t, o in r["ours"].items() if o is res), None)
            if rep == 0 and tp in r["mo"] and out.exists():
                os.replace(out, work / f"ours-tp{tp}-kept")
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=False)
        print(f"# round {rep + 1}/{a.repeat} done", flush=True)
    return equal


def run_flat(a, work: Path, model: Path, logs: Path, created: list, ram_gib: float) -> list:
    """Our whole command and cp+fsync at each --flat layer count, interleaved, --repeat rounds."""
    rows = []
    fpreset = a.flat_preset or a.preset
    for n in a.flats:
        fm = work / f"hf-{fpreset}-{n}l-{a.dtype}"
        if not (fm / "config.json").exists():
            created.append(fm)
            write_model(fm, fpreset, n, a.dtype, a.shard_gb)
        fsize = sum(f.stat().st_size for f in fm.iterdir()) / 1e9
        fits = fsize < 0.5 * ram_gib  # else the runs find what the page cache kept
        r = Result(f"ours fp16 tp {a.target_tp}, {fpreset} shape, {n} layers ({fsize:.1f} GB)")
        rc = Result(f"cp -r + fsync, {n} layers")
        out, fdst = work / f"flat-{n}", work / f"cp-out-flat-{n}"
        fsync_files = " ".join(f"'{fdst / f.name}'" for f in sorted(fm.iterdir()))
        cp_cmd = ["sh", "-c", f"cp -r '{fm}' '{fdst}' && sync {fsync_files}"]
        for _ in range(a.repeat):  # interleaved, as the main cases
            for res, cmd, dst in ((rc, cp_cmd, fdst),
                                  (r, ours_cmd(fm, out, a.target_tp, ["--force"]), out)):
                warm(fm) if fits else None
                run_case(res, cmd, logs / f"flat{n}-{'cp' if res is rc else 'ours'}.log",
                         cleanup=[dst])
                subprocess.run(["sync"], check=False)
        rows.append((n, fsize, r, rc))
        if fm in created and fm != model and not a.keep:
            shutil.rmtree(fm, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    if not Path("/usr/bin/time").exists():
        sys.exit("needs GNU time: apt-get update && apt-get install -y time")
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=work))
    model = work / f"hf-{a.preset}-{a.layers}l-{a.dtype}"
    created: list[Path] = []  # generated here: deleted at the end unless --keep
    info = machine_info()
    print(f"# machine: {info}", flush=True)
    try:
        if not (model / "config.json").exists():
            t0 = time.perf_counter()
            created.append(model)
            write_model(model, a.preset, a.layers, a.dtype, a.shard_gb)
            print(f"# wrote {model} in {time.perf_counter() - t0:.0f}s", flush=True)
        gb = sum(f.stat().st_size for f in model.iterdir()) / 1e9
        shards = len(list(model.glob("*.safetensors")))
        print(f"# model: {a.preset} shape, {a.layers} layers, {a.dtype}, {gb:.2f} GB in {shards} "
              f"shards", flush=True)
        warm(model)
        (logs / "lib_convert.py").write_text(LIB_SCRIPT)
        (logs / "modelopt_export.py").write_text(MODELOPT_SCRIPT)
        r = build_cases(a, model, work, logs)
        equal = run_rounds(a, r, model, work, logs)
        flat_rows = run_flat(a, work, model, logs, created, info["ram_gib"])

        head = (f"Model: **{a.preset}** layer shapes, **{a.layers} layers**, {a.dtype}, "
                f"{gb:.2f} GB in {shards} shards; {a.repeat} run(s) per case, interleaved (median "
                f"wall). Warm runs: input read into the page cache right before the run; cold "
                f"runs: input evicted first; `sync` before each run. Measured "
                f"{time.strftime('%Y-%m-%d')} on {info['nproc']} CPU(s), {info['ram_gib']} GiB "
                f"RAM, {info['disk']}; Python {info['python']}, torch {info['torch']}.")
        lines = [head, "", fmt_table(r["rows"], r["cp"].t, r["cps"].t, gb), "",
                 f"Ours at tp {a.target_tp} equals modelopt's export at tp {a.target_tp} "
                 f"(every tensor, bit for bit): **{equal}**.", ""]
        lines += flat_table(flat_rows)
        checks = targets(a.target_tp, r["cp"], r["cps"], r["ours"].get(a.target_tp), r["lib"],
                         r.get("direct_lib"), r["mo"].get(a.target_tp), flat_rows)
        lines += ["| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {c} | {v} | {'yes' if ok else '**no**'} |" for c, v, ok in checks]
        cmd = "python benchmarks/bench_convert.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
        lines += ["", f"Command: `{cmd.strip()}`"]
        block = "\n".join(lines)
        print()
        print(block, flush=True)
        if a.write_md:
            write_md(a.write_md, block)
            print(f"\n# table written to {a.write_md}")
        errors = [x for x in r["rows"] + [f[2] for f in flat_rows] + [f[3] for f in flat_rows]
                  if x.error]
        for x in errors:
            print(f"# {x.label}: {x.error} (log in {logs})", file=sys.stderr)
        if not errors and not a.keep:
            shutil.rmtree(logs, ignore_errors=True)
        return 1 if errors else 0
    finally:
        # outputs always go; generated models unless --keep (a model found in --workdir is reused
        # and kept)
        for d in work.glob("*"):
            if d.is_dir() and d.name.startswith(("cp-out", "ours-", "modelopt-", "flat-")):
                shutil.rmtree(d, ignore_errors=True)
        if not a.keep:
            for d in created:
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
