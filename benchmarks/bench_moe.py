"""Mixture-of-experts conversion memory: peak RSS of ``build_engine --checkpoint-only`` on a
synthetic Mixtral-8x7B-shaped checkpoint (real layer shapes: hidden 4096, 8 experts of
intermediate 14336, 32 heads / 8 kv heads, vocab 32000; fewer layers), at tp 2 split both ways
(moe_tp 2, and moe_ep 2).

The claim measured: the converter streams an expert stack (``mlp.fc.weight`` [E_local, 2I/moe_tp,
H]) piece by piece (per expert, w3 then w1 rows; chunks of 16 MB), so its memory is bounded by
the same flat ~0.6 GB as a dense model (BENCHMARKS.md, "our peak RSS <= 1 GB": the writer's
staging buffers and the interpreter), never a layer's stack (940 MB per rank at tp 2).

The model is written tensor by tensor (never held in memory) into ~2 GB shards with an index and
a transformers ``MixtralConfig``, in the Hub's per-expert layout. Each case runs once (the machine
is shared) under ``/usr/bin/time -v`` with the /proc process-tree sampler of bench_convert.py.

    python benchmarks/bench_moe.py                   # 2 layers (6.3 GB), tp 2 both ways
    python benchmarks/bench_moe.py --layers 1 --write-md BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import timed  # noqa: E402  (the same /usr/bin/time + /proc tree sampler)
from bench_report import write_md  # noqa: E402
from synth_model import write_repeated  # noqa: E402

SHAPE = dict(hidden=4096, inter=14336, experts=8, top_k=2, heads=32, kv=8, vocab=32000,
             theta=1e6)
MARKS = ("<!-- bench-moe:begin -->", "<!-- bench-moe:end -->")
BOUND_MB = 1024  # the converter's bound (BENCHMARKS.md targets: our peak RSS <= 1 GB)




def hf_tensors(p: dict, layers: int):
    h, i, hd = p["hidden"], p["inter"], p["hidden"] // p["heads"]
    yield "model.embed_tokens.weight", (p["vocab"], h)
    for n in range(layers):
        pre = f"model.layers.{n}."
        yield pre + "input_layernorm.weight", (h,)
        yield pre + "self_attn.q_proj.weight", (p["heads"] * hd, h)
        yield pre + "self_attn.k_proj.weight", (p["kv"] * hd, h)
        yield pre + "self_attn.v_proj.weight", (p["kv"] * hd, h)
        yield pre + "self_attn.o_proj.weight", (h, p["heads"] * hd)
        yield pre + "post_attention_layernorm.weight", (h,)
        yield pre + "block_sparse_moe.gate.weight", (p["experts"], h)
        for e in range(p["experts"]):
            x = f"{pre}block_sparse_moe.experts.{e}."
            yield x + "w1.weight", (i, h)
            yield x + "w2.weight", (h, i)
            yield x + "w3.weight", (i, h)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (p["vocab"], h)


def write_mixtral(out: Path, layers: int, shard_gb: float = 2.0) -> int:
    import torch
    from transformers import MixtralConfig

    total = write_repeated(out, hf_tensors(SHAPE, layers), torch.float16, shard_gb)
    p = SHAPE
    MixtralConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                  num_hidden_layers=layers, num_attention_heads=p["heads"],
                  num_key_value_heads=p["kv"], num_local_experts=p["experts"],
                  num_experts_per_tok=p["top_k"], max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": p["theta"]},
                  architectures=["MixtralForCausalLM"], dtype="float16").save_pretrained(out)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO.parent / "bench-tmp-moe")
    ap.add_argument("--write-md", type=Path)
    a = ap.parse_args(argv)
    model, out = a.workdir / "mixtral", a.workdir / "out"
    shutil.rmtree(a.workdir, ignore_errors=True)
    try:
        gb = write_mixtral(model, a.layers) / 1e9
        expert_mb = SHAPE["inter"] * SHAPE["hidden"] * 2 / 2**20
        stack_mb = SHAPE["experts"] * 2 * SHAPE["inter"] // 2 * SHAPE["hidden"] * 2 / 2**20
        rows = []
        for label, flags in (("tp 2 (moe_tp 2)", ["--tp", "2"]),
                             ("tp 2 (moe_ep 2)", ["--tp", "2", "--moe-ep", "2"])):
            cmd = [sys.executable, "-m", "builders", "--model", str(model), "--output", str(out),
                   "--dtype", "float16", "--checkpoint-only", "--no-progress", *flags]
            wall, rss, tree, rc, text = timed(cmd, a.workdir / "log.txt")
            if rc:
                raise SystemExit(f"{label}: exit {rc}\n{text[-2000:]}")
            rows.append((label, wall, rss, tree))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)
    import torch

    lines = [f"Model: Mixtral-8x7B layer shapes (hidden 4096, 8 experts x intermediate 14336, "
             f"32/8 heads, vocab 32000), **{a.layers} layers**, float16, {gb:.2f} GB; one run per "
             f"case; {platform.machine()}, Python {platform.python_version()}, torch "
             f"{torch.__version__}. One expert tensor (w1) is {expert_mb:.0f} MB; a layer's "
             f"mlp.fc stack at tp 2 (moe_tp 2) is {stack_mb:.0f} MB.", "",
             "| run | wall s | GB/s | peak RSS MB (largest process) | peak RSS MB (process tree) "
             "| within the 1 GB bound |", "|---|---:|---:|---:|---:|---|"]
    for label, wall, rss, tree in rows:
        ok = "yes" if max(rss, tree) <= BOUND_MB else "**no**"
        lines.append(f"| `build_engine --checkpoint-only` fp16 {label} | {wall:.1f} | "
                     f"{gb / wall:.2f} | {rss:.0f} | {tree:.0f} | {ok} |")
    lines += ["", f"Command: `python benchmarks/bench_moe.py --layers {a.layers}"
              f"{' --write-md ' + str(a.write_md) if a.write_md else ''}`"]
    block = "\n".join(lines)
    print(block)
    if a.write_md:
        write_md(a.write_md, block, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
