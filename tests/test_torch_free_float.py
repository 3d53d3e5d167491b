"""A float conversion (fp16 -> fp16, bf16 -> bf16, and casts: bf16 -> fp16, fp32 -> bf16; tp, pp,
head and vocabulary padding, --ranks) runs without importing torch or transformers: convert/ and
model/ import no torch at all (tests/test_structure.py), casts are numpy (convert.casts, equal to
torch's in tests/test_casts.py). The bytes are those of modelopt's export
(tests/test_source_writer_fast_paths.py) and of the golden manifest (tests/golden/)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from common.dtypes import BY_ST, as_dtype

HEAVY = ("torch", "transformers", "modelopt", "safetensors.torch")


def imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime``'s report (one line per module imported)."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", stderr,
                                            re.M)}


def make(tmp_path, name, **kw):
    from examples.tiny import make_tiny_model

    d = tmp_path / name
    make_tiny_model(d, num_hidden_layers=2, max_shard_size="200KB", **kw)
    return d


def cli(*args, importtime=False):
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "builders",
           *map(str, args), "--checkpoint-only", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_dtype_table_matches_torch_and_safetensors():
    from safetensors.torch import _TYPES

    for st, d in BY_ST.items():
        t = _TYPES[st]
        assert (d.torch, d.itemsize, str(d), d.is_floating_point) == \
            (t, t.itemsize, str(t), t.is_floating_point)
        assert as_dtype(t) is d and as_dtype(d.torch_name) is d


@pytest.mark.parametrize("case", ["fp16 tp2 pp2", "bf16 tp2", "padded heads qwen2 tp2",
                                  "ranks", "mixtral bf16 moe_ep2", "bf16 -> fp16 cast tp2",
                                  "fp32 -> bf16 cast tp2"])
def test_float_cli_imports_neither_torch_nor_transformers(tmp_path, case):
    if case == "bf16 tp2":
        hf, flags = make(tmp_path, "hf", dtype=torch.bfloat16), ["--tp", 2, "--dtype", "bfloat16"]
    elif case == "padded heads qwen2 tp2":  # 6 heads / 3 KV heads -> 8 / 4, q/k/v biases
        hf = make(tmp_path, "hf", family="qwen2", dtype=torch.float16, hidden_size=48,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=8)
        flags = ["--tp", 2, "--pad-heads", "--dtype", "float16"]
    elif case == "mixtral bf16 moe_ep2":  # the router is written in float32: an exact widening
        hf = make(tmp_path, "hf", family="mixtral", dtype=torch.bfloat16)
        flags = ["--tp", 2, "--moe-ep", 2, "--dtype", "bfloat16"]
    elif "cast" in case:
        src = torch.bfloat16 if case.startswith("bf16") else torch.float32
        hf = make(tmp_path, "hf", dtype=src)
        flags = ["--tp", 2, "--dtype", "float16" if src == torch.bfloat16 else "bfloat16"]
    else:
        hf, flags = make(tmp_path, "hf", dtype=torch.float16), ["--tp", 2, "--pp", 2,
                                                                "--dtype", "float16"]
    out = tmp_path / "out"
    runs = [flags] if case != "ranks" else [flags + ["--ranks", "0-1"], flags + ["--ranks", "2-3"]]
    for run in runs:
        p = cli("--model", hf, "--output", out, *run, importtime=True)
        assert p.returncode == 0, p.stderr[-2000:]
        mods = imported_modules(p.stderr)
        assert "convert.writer" in mods and "builders.manifest" in mods  # the report is complete
        assert not (set(HEAVY) & mods), sorted(set(HEAVY) & mods)
    assert (out / "build.json").is_file()
    if "cast" in case:  # tensors are torch's casts of the source's (replicated; lm_head's rows)
        from safetensors.torch import load_file

        want_dtype = getattr(torch, flags[-1])
        hf_t = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
        ck = load_file(out / "checkpoint" / "rank1.safetensors")
        for trt, name, rows in [("transformer.layers.1.input_layernorm.weight",
                                 "model.layers.1.input_layernorm.weight", slice(None)),
                                ("transformer.ln_f.weight", "model.norm.weight", slice(None)),
                                ("lm_head.weight", "lm_head.weight", slice(500, None))]:
            assert ck[trt].dtype == want_dtype
            assert torch.equal(ck[trt], hf_t[name][rows].to(want_dtype)), trt
