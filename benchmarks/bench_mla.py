"""DeepSeek-V2 conversion memory: peak RSS of ``build_engine --checkpoint-only --tp 8`` on synthetic
DeepSeek-V2-shaped checkpoints at full width (hidden 5120, 128 heads, q_lora_rank 1536, kv_lora_rank
512, qk_nope / rope / v 128 / 64 / 128, dense layer 0 of intermediate 12288, then MoE layers of 64
routed experts of intermediate 1536 + 2 shared, vocab 102400), with 2 and 4 MoE layers, next to
``cp -r`` + fsync of the same bytes.

The claim measured: the converter streams one tensor piece at a time and computes the absorbed
``fused_q_proj`` one head at a time (convert/compute.py), so its peak is flat in depth and far
below a layer (one MoE layer is 3 GB), against TensorRT-LLM's own converter, which loads the
whole HF model ("CPU memory required >= 770GB" for DeepSeek-V2, its README).

The models are written tensor by tensor (never held in memory) in the Hub's per-expert layout
with a transformers ``DeepseekV2Config``. Each case runs once (the machine is shared) under
``/usr/bin/time -v`` with the /proc process-tree sampler of bench_convert.py.

    python benchmarks/bench_mla.py                           # 2 and 4 MoE layers
    python benchmarks/bench_mla.py --write-md BENCHMARKS.md
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

SHAPE = dict(hidden=5120, heads=128, q_lora=1536, kv_lora=512, nope=128, rope=64, v=128,
             inter=12288, moe_inter=1536, experts=64, shared=2, top_k=6, vocab=102400)
MARKS = ("<!-- bench-mla:begin -->", "<!-- bench-mla:end -->")


def hf_tensors(p: dict, moe_layers: int):
    h, a = p["hidden"], "self_attn."
    yield "model.embed_tokens.weight", (p["vocab"], h)
    for n in range(moe_layers + 1):
        pre = f"model.layers.{n}."
        yield pre + "input_layernorm.weight", (h,)
        yield pre + a + "q_a_proj.weight", (p["q_lora"], h)
        yield pre + a + "q_a_layernorm.weight", (p["q_lora"],)
        yield pre + a + "q_b_proj.weight", (p["heads"] * (p["nope"] + p["rope"]), p["q_lora"])
        yield pre + a + "kv_a_proj_with_mqa.weight", (p["kv_lora"] + p["rope"], h)
        yield pre + a + "kv_a_layernorm.weight", (p["kv_lora"],)
        yield pre + a + "kv_b_proj.weight", (p["heads"] * (p["nope"] + p["v"]), p["kv_lora"])
        yield pre + a + "o_proj.weight", (h, p["heads"] * p["v"])
        yield pre + "post_attention_layernorm.weight", (h,)
        if n == 0:
            for m, shape in (("gate_proj", (p["inter"], h)), ("up_proj", (p["inter"], h)),
                             ("down_proj", (h, p["inter"]))):
                yield f"{pre}mlp.{m}.weight", shape
            continue
        yield pre + "mlp.gate.weight", (p["experts"], h)
        mi, si = p["moe_inter"], p["moe_inter"] * p["shared"]
        for e in range(p["experts"]):
            x = f"{pre}mlp.experts.{e}."
            yield x + "gate_proj.weight", (mi, h)
            yield x + "up_proj.weight", (mi, h)
            yield x + "down_proj.weight", (h, mi)
        yield pre + "mlp.shared_experts.gate_proj.weight", (si, h)
        yield pre + "mlp.shared_experts.up_proj.weight", (si, h)
        yield pre + "mlp.shared_experts.down_proj.weight", (h, si)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (p["vocab"], h)


def write_deepseek(out: Path, moe_layers: int, shard_gb: float = 2.0) -> int:
    import torch
    from transformers import AutoConfig

    total = write_repeated(out, hf_tensors(SHAPE, moe_layers), torch.bfloat16, shard_gb)
    p = SHAPE
    yarn = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
    AutoConfig.for_model(
        "deepseek_v2", vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
        num_hidden_layers=moe_layers + 1, num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"], q_lora_rank=p["q_lora"], kv_lora_rank=p["kv_lora"],
        qk_nope_head_dim=p["nope"], qk_rope_head_dim=p["rope"], v_head_dim=p["v"],
        n_routed_experts=p["experts"], n_shared_experts=p["shared"],
        num_experts_per_tok=p["top_k"], moe_intermediate_size=p["moe_inter"],
        first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=min(8, p["experts"]), topk_group=min(3, p["experts"]),
        routed_scaling_factor=16.0, max_position_embeddings=163840, rope_scaling=yarn,
        architectures=["DeepseekV2ForCausalLM"], dtype="bfloat16").save_pretrained(out)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--workdir", type=Path, default=REPO.parent / "bench-tmp-mla")
    ap.add_argument("--write-md", type=Path)
    ap.add_argument("--smoke", action="store_true", help="4 experts, vocab 1024: a quick run of "
                    "the script itself, not a measurement")
    a = ap.parse_args(argv)
    if a.smoke:
        SHAPE.update(experts=4, vocab=1024, top_k=2)
    rows = []
    for n in a.moe_layers:
        model, out, cp_dst = a.workdir / "deepseek", a.workdir / "out", a.workdir / "cp"
        shutil.rmtree(a.workdir, ignore_errors=True)
        try:
            gb = write_deepseek(model, n) / 1e9
            files = " ".join(f"'{cp_dst / f.name}'" for f in sorted(model.iterdir()))
            cp_wall = timed(["sh", "-c", f"cp -r '{model}' '{cp_dst}' && sync {files}"],
                            a.workdir / "log.txt")[0]
            shutil.rmtree(cp_dst, ignore_errors=True)
            cmd = [sys.executable, "-m", "builders", "--model", str(model), "--output", str(out),
                   "--checkpoint-only", "--no-progress", "--tp", "8"]
            wall, rss, tree, rc, text = timed(cmd, a.workdir / "log.txt")
            if rc:
                raise SystemExit(f"{n} MoE layers: exit {rc}\n{text[-2000:]}")
            rows.append((n, gb, cp_wall, wall, rss, tree))
        finally:
            shutil.rmtree(a.workdir, ignore_errors=True)
    import torch

    lines = [f"Model: DeepSeek-V2 layer shapes (hidden 5120, 128 heads, q/kv LoRA 1536/512, dense "
             f"layer 0 of 12288, 64 routed experts x 1536 + 2 shared, vocab 102400), bfloat16, "
             f"converted at tp 8 (moe_tp 8); one run per case on a shared, loaded machine; "
             f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}. "
             f"One MoE layer's experts are {SHAPE['experts'] * 3 * SHAPE['moe_inter'] * SHAPE['hidden'] * 2 / 1e9:.1f} GB.",
             "", "| MoE layers | GB | `cp -r` + fsync s | `build_engine --checkpoint-only --tp 8` s "
             "| peak RSS MB (largest process) | peak RSS MB (process tree) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n, gb, cp_wall, wall, rss, tree in rows:
        lines.append(f"| {n} | {gb:.2f} | {cp_wall:.1f} | {wall:.1f} | {rss:.0f} | {tree:.0f} |")
    lines += ["", "Command: `python benchmarks/bench_mla.py"
              f"{' --write-md ' + str(a.write_md) if a.write_md else ''}`"]
    block = "\n".join(lines)
    print(block)
    if a.write_md:
        write_md(a.write_md, block, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
