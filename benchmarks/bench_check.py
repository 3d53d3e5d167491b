"""``build_engine check`` on a 70B-shaped 8-rank checkpoint: headers only, target < 2 s.

The checkpoint is synthetic: Llama-3-70B's shapes (80 layers, hidden 8192, 64 heads / 8 KV heads,
intermediate 28672, vocab 128256), float16, tp 8. Each rank file is a real safetensors header
(names, shapes and offsets of the parameters TensorRT-LLM declares for that rank, written from
check/'s own table, so the check passes: what is timed is reading and comparing, not finding
problems) followed by a data region that is a sparse file (``truncate``): ~17.6 GB per rank on
paper, a few KB on disk. ``check`` must never read that region, or the run would take minutes.

    python benchmarks/bench_check.py            # writes /tmp/bench_check_70b, times it 3 times
    python benchmarks/bench_check.py --dir DIR --runs 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from check.declared import declared_rank  # noqa: E402
from common.fileio import header_bytes, nbytes  # noqa: E402
from common.dtypes import BY_NAME  # noqa: E402

CONFIG = {
    "architecture": "LlamaForCausalLM", "dtype": "float16", "logits_dtype": "float32",
    "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_size": 128, "hidden_act": "silu", "norm_epsilon": 1e-5,
    "max_position_embeddings": 8192, "position_embedding_type": "rope_gpt_neox",
    "rotary_base": 500000.0, "use_parallel_embedding": True, "embedding_sharding_dim": 0,
    "mapping": {"world_size": 8, "tp_size": 8, "pp_size": 1},
    "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
}


class _T:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, BY_NAME[dtype]


def write(d: Path) -> int:
    """The 8 rank files (sparse data regions); the bytes they claim in all."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
    claimed = 0
    for r in range(8):
        tensors = [_T(n, p.shape, p.dtype) for n, p in declared_rank(CONFIG, r).items()]
        head = header_bytes(tensors)
        data = sum(nbytes(t.shape, t.dtype) for t in tensors)
        path = d / f"rank{r}.safetensors"
        with open(path, "wb") as f:
            f.write(head)
        os.truncate(path, len(head) + data)  # a hole: nothing is written or read
        claimed += len(head) + data
    return claimed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_check_70b"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    claimed = write(args.dir)
    used = sum(os.stat(p).st_blocks * 512 for p in args.dir.iterdir())
    print(f"checkpoint: {args.dir}: 8 ranks, {claimed / 1e9:.1f} GB claimed, "
          f"{used / 1e6:.2f} MB on disk (sparse)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for i in range(args.runs):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "builders", "check", str(args.dir)],
                           capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
        line = (p.stdout or p.stderr).strip()
        print(f"run {i + 1}: exit {p.returncode}, {wall:.2f} s wall (whole command, interpreter "
              f"start included): {line[:160]}")
    t0 = time.perf_counter()
    from check import check_dir

    result = check_dir(args.dir)
    print(f"in process: {time.perf_counter() - t0:.3f} s for {result.tensors} tensors "
          f"({result.summary()[:60]}...)")


if __name__ == "__main__":
    main()
