"""Pre-quantized input benchmark: a 7B-shaped (Llama-2-7B layer shapes, 32 layers) synthetic GPTQ
int4 checkpoint (AutoGPTQ's format: ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` per linear,
symmetric, group 128; synthetic bits: a random 16 MiB block repeated, float16 embedding, head and
norms random) converted by the whole ``build_engine --model SRC --checkpoint-only`` command (tp 1:
W4A16_AWQ tensors unpacked and repacked tensor by tensor), side by side with ``cp -r`` + fsync of
the same files; peak RSS of the largest process, wall time, ``--repeat`` interleaved rounds, medians.

    python benchmarks/bench_prequant.py --workdir WORKDIR [--layers 32] [--repeat 2] [--write-md BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import machine_info, write_md  # noqa: E402
from measure import REPO, timed, warm  # noqa: E402
from synth_model import PRESETS, hf_tensors, write_shards  # noqa: E402

MARKS = ("<!-- bench-prequant:begin -->", "<!-- bench-prequant:end -->")
GROUP = 128


def gptq_tensors(p: dict, layers: int):
    """(name, shape, dtype name) of the GPTQ checkpoint's tensors."""
    for name, shape in hf_tensors(p, layers):
        if len(shape) == 2 and ".layers." in name:
            out, inp = shape
            pre = name[:-len("weight")]
            yield pre + "qweight", (inp // 8, out), "int32"
            yield pre + "qzeros", (inp // GROUP, out // 8), "int32"
            yield pre + "scales", (inp // GROUP, out), "float16"
            yield pre + "g_idx", (inp,), "int32"
        else:
            yield name, shape, "float16"


def write_gptq(out: Path, layers: int, shard_gb: float = 2.0) -> int:
    import numpy as np
    import torch
    from transformers import LlamaConfig

    p = PRESETS["7b"]

    @dataclass
    class T:
        name: str
        shape: tuple
        dtype: object

    shards, cur, size, limit = [], [], 0, int(shard_gb * 2**30)
    for name, shape, dt in gptq_tensors(p, layers):
        n = int(np.prod(shape)) * (2 if dt == "float16" else 4)
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(T(name, tuple(shape), getattr(torch, dt)))
        size += n
    shards.append(cur)
    block = torch.from_numpy(np.random.default_rng(0).integers(0, 2**32, 4 * 2**20, dtype=np.uint32)
                             .view(np.int32))

    def produce(t):
        leaf = t.name.rsplit(".", 1)[1]
        if leaf == "g_idx":
            yield torch.arange(t.shape[0], dtype=torch.int32) // GROUP
        elif leaf == "qzeros":  # symmetric: every stored zero 7 (zero point 8)
            yield torch.full(t.shape, 0x77777777, dtype=torch.int32)
        elif leaf == "qweight":
            flat = block
            rows = max(1, flat.numel() // t.shape[1])
            for a in range(0, t.shape[0], rows):
                k = min(rows, t.shape[0] - a)
                yield flat[:k * t.shape[1]].reshape(k, t.shape[1])
        elif leaf == "scales":
            yield (torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) * 1e-3 + 1e-4).half()
        else:
            g = torch.Generator().manual_seed(2)
            rows = max(1, (16 * 2**20) // (t.shape[-1] * 2))
            for a in range(0, t.shape[0], rows if len(t.shape) == 2 else t.shape[0]):
                k = min(rows, t.shape[0] - a) if len(t.shape) == 2 else t.shape[0]
                yield (torch.randn((k, *t.shape[1:]), generator=g) * 0.02).half()

    total = write_shards(out, shards, produce)
    LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                num_hidden_layers=layers, num_attention_heads=p["heads"],
                num_key_value_heads=p["kv"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                architectures=["LlamaForCausalLM"], dtype="float16").save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                  "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--write-md")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    src = work / f"gptq7b_{a.layers}"
    if not (src / "config.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        write_gptq(src, a.layers)
    gb = sum(f.stat().st_size for f in src.iterdir()) / 1e9
    ours = [sys.executable, "-c", "import sys; from builders.cli import main; sys.exit(main())"]
    out, copy = work / "out", work / "copy"
    runs = {"ours": [], "cp": []}
    load = " / ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    for r in range(a.repeat):
        for case in ("ours", "cp"):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(copy, ignore_errors=True)
            warm(src)
            cmd = [*ours, "--model", str(src), "--output", str(out), "--checkpoint-only",
                   "--no-progress"] if case == "ours" else \
                ["sh", "-c", f"cp -r '{src}' '{copy}' && sync '{copy}'/*"]
            wall, rss, tree, rc, text = timed(cmd, work / f"{case}{r}.log",
                                              env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
            if rc:
                print(text[-3000:])
                return 1
            runs[case].append((wall, rss))
            print(f"round {r} {case}: {wall:.1f} s, peak RSS {rss:.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    t_ours = statistics.median(w for w, _ in runs["ours"])
    t_cp = statistics.median(w for w, _ in runs["cp"])
    rss = max(m for _, m in runs["ours"])
    m = machine_info()
    block = "\n".join([
        "| input | layers | ours | cp -r + fsync | × cp+fsync | peak RSS (ours) | command |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| synthetic GPTQ int4 (sym, group 128), 7B shapes, {gb:.2f} GB | {a.layers} | "
        f"{t_ours:.1f} s | {t_cp:.1f} s | {t_ours / t_cp:.2f} | {rss:.0f} MB | "
        f"`python benchmarks/bench_prequant.py --workdir WORKDIR --layers {a.layers} "
        f"--repeat {a.repeat}` |",
        "", f"Rounds (wall s, peak RSS MB): ours {runs['ours']}, cp {runs['cp']}; machine: "
        f"{m['cpu']}, {m['nproc']} cores, load average {load} at the start."])
    print(block)
    if a.write_md:
        write_md(Path(a.write_md), block, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
