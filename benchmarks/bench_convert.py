"""Conversion benchmark at real Llama shapes: ours vs ``cp`` vs nvidia-modelopt's export.

1. Writes a Hugging Face Llama checkpoint of real layer shapes (7B, 8B, 70B layer shapes, fewer
   layers) with random weights, tensor by tensor into ~2 GB safetensors shards with a
   ``model.safetensors.index.json`` and a transformers ``LlamaConfig`` — the model is never held
   in memory.
2. Measures, in one run and side by side, each as a subprocess under ``/usr/bin/time -v`` (wall
   time, peak RSS of the largest process) plus a /proc sampler (peak RSS summed over the process
   tree, which matters for ``--workers``):

   - ``cp -r`` of the model dir (the floor on this disk), and ``cp -r`` followed by an fsync of
     every copied file (``sync FILE...``), since our converter fsyncs each file it writes;
   - ``build_engine --checkpoint-only --no-progress`` in fp16 at each ``--tp`` (the whole
     command, as a user runs it: imports, conversion, build.json with its sha256 of inputs and
     outputs); its "checkpoint ... in Xs" line gives the conversion stage;
   - ``convert_checkpoint()`` alone, timed inside a process that has imported torch already
     (the part convert/ owns);
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

Prints a markdown table; ``--write-md BENCHMARKS.md`` also puts it between the markers
``<!-- bench:begin -->`` / ``<!-- bench:end -->`` of that file.

    python benchmarks/bench_convert.py                    # 7B shape, 8 layers; flat 8 vs 32
    python benchmarks/bench_convert.py --quick            # minutes: 7B shape, 2 layers, tp 2
    python benchmarks/bench_convert.py --preset 8b --layers 4 --tp 2,8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    # name: hidden, inter, heads, kv heads, vocab, rope theta, default layers
    "1b": dict(hidden=2048, inter=5632, heads=32, kv=4, vocab=32000, theta=10000.0, layers=22),
    "7b": dict(hidden=4096, inter=11008, heads=32, kv=32, vocab=32000, theta=10000.0, layers=8),
    "8b": dict(hidden=4096, inter=14336, heads=32, kv=8, vocab=128256, theta=500000.0, layers=8),
    "70b": dict(hidden=8192, inter=28672, heads=64, kv=8, vocab=128256, theta=500000.0, layers=2),
}
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


# ----------------------------------------------------------------------------- model writer

def hf_tensors(p: dict, layers: int):
    """(name, shape) of every tensor of a HF Llama checkpoint, in the usual order."""
    h, i, hd = p["hidden"], p["inter"], p["hidden"] // p["heads"]
    q, kv = p["heads"] * hd, p["kv"] * hd
    yield "model.embed_tokens.weight", (p["vocab"], h)
    for n in range(layers):
        pre = f"model.layers.{n}."
        yield pre + "input_layernorm.weight", (h,)
        yield pre + "self_attn.q_proj.weight", (q, h)
        yield pre + "self_attn.k_proj.weight", (kv, h)
        yield pre + "self_attn.v_proj.weight", (kv, h)
        yield pre + "self_attn.o_proj.weight", (h, q)
        yield pre + "post_attention_layernorm.weight", (h,)
        yield pre + "mlp.gate_proj.weight", (i, h)
        yield pre + "mlp.up_proj.weight", (i, h)
        yield pre + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (p["vocab"], h)


def write_shards(out: Path, shards: list, produce) -> int:
    """Write ``shards`` (lists of planned tensors) as a sharded HF model into ``out``, each file
    streamed by ``produce``, with its ``model.safetensors.index.json``; return the bytes written."""
    from convert.writer import nbytes, write_file

    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(out / fname, shard, produce)
        for t in shard:
            weight_map[t.name] = fname
            total += nbytes(t.shape, t.dtype)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def write_model(out: Path, preset: str, layers: int, dtype: str, shard_gb: float) -> int:
    """Write a random HF Llama checkpoint to ``out`` shard by shard; return its weight bytes."""
    import torch
    from transformers import LlamaConfig

    from convert.writer import nbytes

    p = PRESETS[preset]
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]

    @dataclass
    class T:
        name: str
        shape: tuple
        dtype: object = tdtype

    shards, cur, cur_bytes, limit = [], [], 0, int(shard_gb * 2**30)
    for name, shape in hf_tensors(p, layers):
        size = nbytes(shape, tdtype)
        if cur and cur_bytes + size > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(T(name, tuple(shape)))
        cur_bytes += size
    shards.append(cur)

    def produce(t):
        g = torch.Generator().manual_seed(zlib.crc32(t.name.encode()))
        if len(t.shape) == 1:
            yield (1.0 + 0.05 * torch.randn(t.shape, generator=g)).to(tdtype)
            return
        rows, cols = t.shape
        step = max(1, (16 * 2**20) // cols)
        for a in range(0, rows, step):
            n = min(step, rows - a)
            yield torch.randn((n, cols), generator=g).mul_(0.02).to(tdtype)

    total = write_shards(out, shards, produce)
    LlamaConfig(
        vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
        num_hidden_layers=layers, num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": p["theta"]},
        architectures=["LlamaForCausalLM"], dtype=dtype,
    ).save_pretrained(out)
    return total


# ----------------------------------------------------------------------------- measuring

@dataclass
class Result:
    label: str
    wall: list = field(default_factory=list)       # seconds, one per repeat
    rss_mb: list = field(default_factory=list)     # /usr/bin/time: largest process
    tree_mb: list = field(default_factory=list)    # sampled: sum over the process tree
    stage: list = field(default_factory=list)      # ours: the CLI's "checkpoint ... in Xs"
    phases: list = field(default_factory=list)     # modelopt: imports/load/export split
    note: str = ""
    error: str = ""

    @property
    def t(self):
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def st(self):
        return statistics.median(self.stage) if self.stage else None

    @property
    def rss(self):
        return max(self.rss_mb) if self.rss_mb else float("nan")

    @property
    def tree(self):
        return max(self.tree_mb) if self.tree_mb else float("nan")


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sample_tree(root: int, stop: threading.Event, peak: list):
    """Peak of the RSS summed over ``root``'s descendants (excluding /usr/bin/time itself)."""
    while not stop.is_set():
        kids, todo, total = _children_map(), list(_children_map().get(root, [])), 0
        seen = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += _rss_kb(pid)
            todo += kids.get(pid, [])
        peak[0] = max(peak[0], total)
        stop.wait(0.05)


def timed(cmd: list, log: Path, env=None, cwd=None):
    """Run ``cmd`` under /usr/bin/time -v; return (wall s, max RSS MB, tree peak MB, rc)."""
    subprocess.run(["sync"], check=False)
    with open(log, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=lf, stderr=lf, env=env,
                                cwd=cwd or REPO)
        stop, peak = threading.Event(), [0]
        th = threading.Thread(target=_sample_tree, args=(proc.pid, stop, peak), daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    text = log.read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    return wall, rss, peak[0] / 1024, rc, text


def run_case(res: Result, cmd: list, log: Path, cleanup=(), env=None, cwd=None):
    wall, rss, tree, rc, text = timed(cmd, log, env=env, cwd=cwd)
    if rc != 0:
        body = text.split("\tCommand being timed")[0].strip().splitlines()
        res.error = f"exit {rc}: {body[-1] if body else '?'}"
    else:
        res.wall.append(wall)
        res.rss_mb.append(rss)
        res.tree_mb.append(tree)
        m = re.search(r"^checkpoint: .*\) in ([0-9.]+)s$", text, re.M) or \
            re.search(r"^convert_checkpoint: ([0-9.]+)s$", text, re.M)
        if m:
            res.stage.append(float(m.group(1)))
        m = re.search(r"^modelopt phases: (.*)$", text, re.M)
        if m:
            res.phases.append(m.group(1))
    for c in cleanup:
        shutil.rmtree(c, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    return res


def evict(model: Path):
    """Drop the input's (clean) pages from the page cache: posix_fadvise DONTNEED per file."""
    for f in sorted(model.iterdir()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(model: Path):
    """Read every source file once so all runs see the input in the page cache."""
    buf = bytearray(64 * 2**20)
    for f in sorted(model.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def ours_cmd(model: Path, out: Path, tp: int, extra=()):
    return [sys.executable, "-m", "builders", "--model", str(model), "--output", str(out),
            "--tp", str(tp), "--dtype", "float16", "--checkpoint-only", "--no-progress", *extra]


LIB_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[4])
from convert.convert import convert_checkpoint
from convert.hf_config import read_hf_config
read_hf_config(sys.argv[1])  # torch is imported (convert.convert) before the clock starts
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


# ----------------------------------------------------------------------------- report

def machine_info() -> dict:
    import torch

    mem = next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]
    disk = "?"
    try:
        dev = subprocess.run(["df", "--output=source", str(REPO)], capture_output=True,
                             text=True).stdout.split()[-1]
        fs = subprocess.run(["df", "--output=fstype", str(REPO)], capture_output=True,
                            text=True).stdout.split()[-1]
        blk = Path("/sys/block") / Path(dev).name
        rot = (blk / "queue/rotational").read_text().strip() if blk.exists() else "?"
        disk = f"{dev} ({fs}; virtio block device, rotational={rot})" if "vd" in dev else \
            f"{dev} ({fs}, rotational={rot})"
    except Exception:
        pass
    cpu = "?"
    try:
        cpu = next(l for l in open("/proc/cpuinfo") if l.startswith("model name")).split(":")[1].strip()
    except Exception:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(int(mem) / 2**20, 1),
            "disk": disk, "python": platform.python_version(), "torch": torch.__version__,
            "kernel": platform.release()}


def fmt_table(rows, cp_t, cpsync_t, gb) -> str:
    out = ["| run | wall s | × cp | × cp+fsync | GB/s | convert stage s (× cp+fsync) "
           "| peak RSS MB (largest process) | peak RSS MB (process tree) | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error or not r.wall:
            out.append(f"| {r.label} | – | – | – | – | – | – | – | {r.error or r.note} |")
            continue
        stage = f"{r.st:.1f} ({r.st / cpsync_t:.2f})" if r.st is not None else ""
        runs = "" if len(r.wall) < 2 else f"runs: {', '.join(f'{w:.1f}' for w in r.wall)}"
        phases = r.phases[len(r.phases) // 2] if r.phases else ""
        note = "; ".join(x for x in (r.note, phases, runs) if x)
        out.append(f"| {r.label} | {r.t:.1f} | {r.t / cp_t:.2f} | {r.t / cpsync_t:.2f} | "
                   f"{gb / r.t:.2f} | {stage} | {r.rss:.0f} | {r.tree:.0f} | {note} |")
    return "\n".join(out)


def write_md(path: Path, block: str):
    text = path.read_text() if path.exists() else ""
    new = f"{MARK_BEGIN}\n{block}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + new + text[b:]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + new + "\n"
    path.write_text(text)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="dtype of the written HF checkpoint (conversion is always to fp16)")
    ap.add_argument("--tp", default="1,2,4", help="our fp16 runs, comma-separated tp sizes")
    ap.add_argument("--target-tp", type=int, default=2, help="tp of the target comparisons")
    ap.add_argument("--modelopt-tp", default=None,
                    help="tp sizes for modelopt (default: --target-tp); 'none' skips modelopt")
    ap.add_argument("--workers", type=int, default=0,
                    help="also run ours at --target-tp with this many --workers (0: skip)")
    ap.add_argument("--compare-tree", type=Path,
                    help="also time `python -m builders` of another checkout of this project "
                         "(e.g. `git archive <rev> | tar -x -C DIR`) at --target-tp: before/after")
    ap.add_argument("--no-ab-direct", dest="ab_direct", action="store_false",
                    help="skip the runs with BUILD_ENGINE_DIRECT_IO=0 (page cache, no O_DIRECT)")
    ap.add_argument("--no-cold", dest="cold", action="store_false",
                    help="skip the cold-input runs (input evicted with posix_fadvise DONTNEED)")
    ap.add_argument("--flat", default="8,32",
                    help="layer counts for the RSS flatness check ('none' skips it)")
    ap.add_argument("--flat-preset", default=None, help="preset of the flatness check "
                                                        "(default: --preset)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per case, interleaved (median wall; default 3, --quick 1)")
    ap.add_argument("--wo-flags", default="--int8-weight-only",
                    help="our int8 weight-only flags (skipped when the first is not in --help)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="HF shard size")
    ap.add_argument("--workdir", type=Path, default=REPO.parent / "bench-tmp",
                    help="where models and outputs go (deleted afterwards unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: 2 layers, tp 2 only, flatness 2 vs 8 layers")
    ap.add_argument("--write-md", type=Path, help="put the result table into this markdown file")
    a = ap.parse_args(argv)

    if not Path("/usr/bin/time").exists():
        sys.exit("needs GNU time: apt-get update && apt-get install -y time")
    p = PRESETS[a.preset]
    layers = a.layers or p["layers"]
    tps = [int(x) for x in a.tp.split(",") if x]
    flat = [] if a.flat == "none" else [int(x) for x in a.flat.split(",")]
    if a.quick:
        layers = a.layers or 2
        tps = [a.target_tp]
        flat = [] if a.flat == "none" else [2, 8]
    a.repeat = a.repeat or (1 if a.quick else 3)
    mo_tps = [a.target_tp] if a.modelopt_tp is None else \
        ([] if a.modelopt_tp == "none" else [int(x) for x in a.modelopt_tp.split(",")])

    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=work))
    model = work / f"hf-{a.preset}-{layers}l-{a.dtype}"
    created: list[Path] = []  # generated here: deleted at the end unless --keep
    info = machine_info()
    print(f"# machine: {info}", flush=True)
    try:
        if not (model / "config.json").exists():
            t0 = time.perf_counter()
            created.append(model)
            write_model(model, a.preset, layers, a.dtype, a.shard_gb)
            print(f"# wrote {model} in {time.perf_counter() - t0:.0f}s", flush=True)
        size = sum(f.stat().st_size for f in model.iterdir())
        gb = size / 1e9
        print(f"# model: {a.preset} shape, {layers} layers, {a.dtype}, {gb:.2f} GB in "
              f"{len(list(model.glob('*.safetensors')))} shards", flush=True)
        warm(model)

        wo_flags = a.wo_flags.split()
        has_wo = cli_has(wo_flags[0])
        (logs / "lib_convert.py").write_text(LIB_SCRIPT)
        (logs / "modelopt_export.py").write_text(MODELOPT_SCRIPT)
        tt = a.target_tp
        cp_dst = work / "cp-out"
        cp_files = " ".join(f"'{cp_dst / f.name}'" for f in sorted(model.iterdir()))
        cp_sync = ["sh", "-c", f"cp -r '{model}' '{cp_dst}' && sync {cp_files}"]
        direct_env = dict(os.environ, BUILD_ENGINE_DIRECT_IO="0")

        # (result, command, output dir, cwd, env, evict the input from the page cache first)
        cases = []
        cp = Result("cp -r (no fsync)")
        cps = Result("cp -r + fsync each file", note="baseline of the targets")
        cases += [(cp, ["cp", "-r", str(model), str(cp_dst)], cp_dst, None, None, False),
                  (cps, cp_sync, cp_dst, None, None, False)]
        ours = {}
        for tp in tps:
            ours[tp] = Result(f"ours fp16 tp {tp}", note="whole `build_engine` command")
            out = work / f"ours-tp{tp}"
            cases.append((ours[tp], ours_cmd(model, out, tp, ["--force"]), out, None, None, False))
        lib = Result(f"ours fp16 tp {tt}: `convert_checkpoint()` only",
                     note="torch imported before the clock; no build.json")
        cases.append((lib, [sys.executable, str(logs / "lib_convert.py"), str(model),
                            str(work / "ours-lib" / "checkpoint"), str(tt), str(REPO)],
                      work / "ours-lib", None, None, False))
        direct = Result(f"ours fp16 tp {tt}, BUILD_ENGINE_DIRECT_IO=0",
                        note="page-cache writes, build.json reads the outputs back "
                             "(default: O_DIRECT, hashed while written)")
        direct_lib = Result(f"ours fp16 tp {tt}: `convert_checkpoint()` only, "
                            f"BUILD_ENGINE_DIRECT_IO=0", note="page cache; imports before the clock")
        if a.ab_direct:
            out = work / "ours-direct"
            cases.append((direct, ours_cmd(model, out, tt, ["--force"]), out, None,
                          direct_env, False))
            cases.append((direct_lib, [sys.executable, str(logs / "lib_convert.py"), str(model),
                                       str(work / "ours-lib-direct" / "checkpoint"), str(tt),
                                       str(REPO)], work / "ours-lib-direct", None, direct_env,
                          False))
        before = Result(f"before: `{a.compare_tree}` fp16 tp {tt}",
                        note="the checkout given by --compare-tree")
        if a.compare_tree:
            out = work / "ours-before"
            cases.append((before, ours_cmd(model, out, tt, ["--force"]), out, a.compare_tree,
                          None, False))
        wo = Result(f"ours int8 weight-only tp {tt}")
        if has_wo:
            out = work / "ours-wo"
            cases.append((wo, ours_cmd(model, out, tt, ["--force", *wo_flags]), out, None, None,
                          False))
        else:
            wo.note = f"not available yet (no {wo_flags[0]} in the CLI)"
        wk = Result(f"ours fp16 tp {tt} --workers {a.workers}")
        if a.workers:
            out = work / "ours-workers"
            cases.append((wk, ours_cmd(model, out, tt, ["--force", "--workers", str(a.workers)]),
                          out, None, None, False))
        mo = {}
        for tp in mo_tps:
            mo[tp] = Result(f"modelopt export tp {tp}",
                            note="incl. imports and HF model load; no fsync")
            out = work / f"modelopt-tp{tp}"
            cases.append((mo[tp], [sys.executable, str(logs / "modelopt_export.py"), str(model),
                                   str(out), str(tp)], out, None, None, False))
        cold_cp = Result("cold input: cp -r + fsync each file",
                         note="input evicted from the page cache before the run")
        cold_ours = Result(f"cold input: ours fp16 tp {tt}",
                           note="input evicted from the page cache before the run")
        if a.cold:
            out = work / "ours-cold"
            cases += [(cold_cp, cp_sync, cp_dst, None, None, True),
                      (cold_ours, ours_cmd(model, out, tt, ["--force"]), out, None, None, True)]

        equal = "not checked"
        for rep in range(a.repeat):
            for res, cmd, out, cwd, env, cold in cases:
                evict(model) if cold else warm(model)
                shutil.rmtree(out, ignore_errors=True)
                run_case(res, cmd, logs / f"{re.sub(r'[^a-z0-9]+', '_', res.label.lower())}.log",
                         env=env, cwd=cwd)
                tp = next((t for t, r in mo.items() if r is res), None)
                if tp is not None and rep == 0 and tp in ours:
                    mine = work / f"ours-tp{tp}-kept" / "checkpoint"
                    if mine.exists() and out.exists():
                        equal = same_checkpoint(mine, out, tp)
                        print(f"# ours tp {tp} == modelopt tp {tp}: {equal}", flush=True)
                    shutil.rmtree(mine.parent, ignore_errors=True)
                if rep == 0 and res in ours.values() and mo_tps:
                    tp = next(t for t, r in ours.items() if r is res)
                    if tp in mo and out.exists():
                        os.replace(out, work / f"ours-tp{tp}-kept")
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
            print(f"# round {rep + 1}/{a.repeat} done", flush=True)
        rows = [cp, cps, *ours.values(), lib] + ([direct, direct_lib] if a.ab_direct else []) + \
            ([before] if a.compare_tree else []) + [wo] + ([wk] if a.workers else []) + \
            list(mo.values()) + ([cold_cp, cold_ours] if a.cold else [])

        flat_rows = []
        fpreset = a.flat_preset or a.preset
        for n in flat:
            fm = work / f"hf-{fpreset}-{n}l-{a.dtype}"
            if not (fm / "config.json").exists():
                created.append(fm)
                write_model(fm, fpreset, n, a.dtype, a.shard_gb)
            fsize = sum(f.stat().st_size for f in fm.iterdir()) / 1e9
            warm(fm) if fsize < 0.5 * info["ram_gib"] else None
            r = Result(f"ours fp16 tp {a.target_tp}, {fpreset} shape, {n} layers ({fsize:.1f} GB)")
            rc = Result(f"cp -r + fsync, {n} layers")
            out, fdst = work / f"flat-{n}", work / f"cp-out-flat-{n}"
            fsync_files = " ".join(f"'{fdst / f.name}'" for f in sorted(fm.iterdir()))
            for _ in range(a.repeat):  # interleaved, as the main cases
                for res, cmd, dst in ((rc, ["sh", "-c", f"cp -r '{fm}' '{fdst}' && sync "
                                                        f"{fsync_files}"], fdst),
                                      (r, ours_cmd(fm, out, a.target_tp, ["--force"]), out)):
                    warm(fm) if fsize < 0.5 * info["ram_gib"] else None
                    run_case(res, cmd, logs / f"flat{n}-{'cp' if res is rc else 'ours'}.log",
                             cleanup=[dst])
                    subprocess.run(["sync"], check=False)
            flat_rows.append((n, fsize, r, rc))
            if fm in created and fm != model and not a.keep:
                shutil.rmtree(fm, ignore_errors=True)

        # ------------------------------------------------------------------ report
        cp_t, cps_t = cp.t, cps.t
        head = (f"Model: **{a.preset}** layer shapes, **{layers} layers**, {a.dtype}, "
                f"{gb:.2f} GB in {len(list(model.glob('*.safetensors')))} shards; "
                f"{a.repeat} run(s) per case, interleaved (median wall). Warm runs: input read "
                f"into the page cache right before the run; cold runs: input evicted first; "
                f"`sync` before each run. Measured "
                f"{time.strftime('%Y-%m-%d')} on {info['nproc']} CPU(s), {info['ram_gib']} GiB "
                f"RAM, {info['disk']}; Python {info['python']}, torch {info['torch']}.")
        table = fmt_table(rows, cp_t, cps_t, gb)
        lines = [head, "", table, ""]
        lines.append(f"Ours at tp {a.target_tp} equals modelopt's export at tp {a.target_tp} "
                     f"(every tensor, bit for bit): **{equal}**.")
        lines.append("")
        tgt = ours.get(a.target_tp)
        mo_t = mo.get(a.target_tp)
        checks = []
        if tgt and tgt.wall:
            checks.append((f"`build_engine` fp16 tp {a.target_tp}, whole command ≤ 1.3 × "
                           f"cp+fsync", f"{tgt.t / cps_t:.2f}×", tgt.t <= 1.3 * cps_t))
            checks.append((f"`build_engine` fp16 tp {a.target_tp}, whole command ≤ 1.5 × plain "
                           f"cp (no fsync)", f"{tgt.t / cp_t:.2f}×", tgt.t <= 1.5 * cp_t))
            if tgt.st is not None:
                checks.append((f"`build_engine` fp16 tp {a.target_tp}, its checkpoint stage "
                               f"(config read, plan, read, write, fsync)"
                               f" ≤ 1.5 × cp+fsync", f"{tgt.st / cps_t:.2f}×",
                               tgt.st <= 1.5 * cps_t))
            if lib.st is not None:
                checks.append((f"fp16 tp {a.target_tp}, `convert_checkpoint()` after imports "
                               f"(plan, read, shard, write, fsync, verify) ≤ 1.5 × cp+fsync",
                               f"{lib.st / cps_t:.2f}×", lib.st <= 1.5 * cps_t))
            if a.ab_direct and direct_lib.st is not None:
                checks.append((f"the same with BUILD_ENGINE_DIRECT_IO=0 ≤ 1.5 × cp+fsync",
                               f"{direct_lib.st / cps_t:.2f}×", direct_lib.st <= 1.5 * cps_t))
            checks.append(("our peak RSS ≤ 1 GB", f"{tgt.rss:.0f} MB", tgt.rss <= 1024))
            if mo_t and mo_t.wall:
                checks.append(("≥ 3× faster than modelopt", f"{mo_t.t / tgt.t:.1f}×",
                               mo_t.t >= 3 * tgt.t))
                checks.append(("≤ 1/4 of modelopt's peak RSS", f"{tgt.rss / mo_t.rss:.3f}",
                               tgt.rss <= mo_t.rss / 4))
        if flat_rows and flat_rows[-1][2].wall and flat_rows[-1][3].wall:
            n, fsize, r, rc = flat_rows[-1]
            checks.append((f"`build_engine` fp16 tp {a.target_tp}, {n} layers ({fsize:.1f} GB), "
                           f"whole command ≤ 1.0 × cp+fsync", f"{r.t / rc.t:.2f}×", r.t <= rc.t))
        if len(flat_rows) >= 2:
            lo, hi = flat_rows[0][2], flat_rows[-1][2]
            if lo.wall and hi.wall:
                checks.append((f"peak RSS flat from {flat_rows[0][0]} to {flat_rows[-1][0]} "
                               f"layers (within 10%)", f"{lo.rss:.0f} → {hi.rss:.0f} MB",
                               hi.rss <= 1.1 * lo.rss and hi.rss <= 1024))
        if flat_rows:
            lines += ["| flatness run | wall s | GB/s | cp+fsync s | × cp+fsync | peak RSS MB | "
                      "tree RSS MB | runs (ours; cp+fsync) |",
                      "|---|---:|---:|---:|---:|---:|---:|---|"]
            for n, fsize, r, rc in flat_rows:
                if not (r.wall and rc.wall):
                    lines.append(f"| {r.label} | – | – | – | – | – | – | {r.error or rc.error} |")
                    continue
                runs = ", ".join(f"{x:.1f}" for x in r.wall) + "; " + \
                    ", ".join(f"{x:.1f}" for x in rc.wall)
                lines.append(f"| {r.label} | {r.t:.1f} | {fsize / r.t:.2f} | {rc.t:.1f} | "
                             f"{r.t / rc.t:.2f} | {r.rss:.0f} | {r.tree:.0f} | {runs} |")
            lines.append("")
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
        errors = [r for r in rows if r.error]
        for r in errors:
            print(f"# {r.label}: {r.error} (log in {logs})", file=sys.stderr)
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
