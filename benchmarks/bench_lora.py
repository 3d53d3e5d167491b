"""Conversion of a 7B-shaped LoRA adapter (Llama-2-7B: 32 layers, hidden 4096, intermediate
11008, 32 heads; q/k/v/o + gate/up/down) for the engine: time and peak RSS.

1. Writes a random PEFT adapter of those shapes (``adapter_config.json`` +
   ``adapter_model.safetensors``, fp16, rank ``--rank``) without any base model: only its shape
   is needed (``model.shape.Shape``).
2. In a fresh process: ``model.lora.read_adapter`` (the preflight) and ``convert.lora.
   convert_adapter`` (one module at a time into a memory-mapped ``model.lora_weights.npy``) at
   ``--tp``, fp16; wall time and the process's peak RSS (``ru_maxrss``) against the adapter's and
   the output's sizes.

    python benchmarks/bench_lora.py --rank 64 --tp 2
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = dict(family="llama", layers=32, heads=32, kv_heads=32, head_size=128, hidden=4096,
             inter=11008, vocab=32000, tied=False, attn_bias=False, dense_bias=False,
             mlp_bias=False)
MODULES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
           "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
           "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
           "mlp.down_proj": (4096, 11008)}


def make_adapter(d: Path, rank: int) -> int:
    """A random fp16 PEFT adapter of 7B shapes in ``d``; its safetensors size."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": [m.rpartition(".")[2] for m in MODULES]}))
    header, offset, names = {}, 0, []
    for layer in range(SHAPE["layers"]):
        for mod, (out, inp) in MODULES.items():
            for ab, shape in (("A", [rank, inp]), ("B", [out, rank])):
                name = f"base_model.model.model.layers.{layer}.{mod}.lora_{ab}.weight"
                n = shape[0] * shape[1] * 2
                header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
                offset += n
                names.append((name, shape))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(d / "adapter_model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in names:
            f.write((rng.standard_normal(shape, np.float32) * 0.01).astype(np.float16).tobytes())
    return (d / "adapter_model.safetensors").stat().st_size


def convert_once(adapter: Path, out: Path, tp: int) -> dict:
    """In this process: preflight + conversion; time and peak RSS."""
    from common.dtypes import FLOAT16
    from convert.lora import convert_adapter
    from model.families import FAMILIES
    from model.lora import read_adapter
    from model.shape import Shape

    shape = Shape(**SHAPE)
    t0 = time.perf_counter()
    a = read_adapter(adapter, 1, FAMILIES["llama"], shape, 64)
    t1 = time.perf_counter()
    rec = convert_adapter(a, FAMILIES["llama"], shape, tp, FLOAT16, out)
    t2 = time.perf_counter()
    return {"preflight_s": round(t1 - t0, 3), "convert_s": round(t2 - t1, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rows": rec["rows"], "max_row": rec["max_row"],
            "out_mb": round((out / "model.lora_weights.npy").stat().st_size / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(convert_once(Path(a.child[0]), Path(a.child[1]), a.tp)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        size = make_adapter(Path(tmp) / "adapter", a.rank)
        res = subprocess.run([sys.executable, __file__, "--tp", str(a.tp), "--child",
                              str(Path(tmp) / "adapter"), str(Path(tmp) / "out")],
                             capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(rank=a.rank, tp=a.tp, adapter_mb=round(size / 2**20, 1))
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
