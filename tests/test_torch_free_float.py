"""A float conversion without casts (fp16 -> fp16, bf16 -> bf16; tp, pp, head and vocabulary
padding, --ranks) runs without importing torch or transformers, and writes the same bytes as the
torch path (``chunks.BYTE_COPIES = False``: column slices and zero padding through torch, as dtype
casts go)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from convert import chunks
from convert_helper import convert_checkpoint
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
                                  "ranks", "mixtral bf16 moe_ep2"])
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
    # the same checkpoint as the torch path, byte for byte
    ref = tmp_path / "ref"
    kw = dict(tp=2, pp=1 if "pp2" not in case and case != "ranks" else 2,
              dtype=flags[flags.index("--dtype") + 1], pad_heads="--pad-heads" in flags,
              moe_ep=2 if "--moe-ep" in flags else None)
    _convert_torch_path(hf, ref, **kw)
    assert_same_files(out / "checkpoint", ref)
    assert (out / "build.json").is_file()


def _convert_torch_path(hf, out, **kw):
    old = chunks.BYTE_COPIES
    chunks.BYTE_COPIES = False
    try:
        convert_checkpoint(hf, out, progress=False, **kw)
    finally:
        chunks.BYTE_COPIES = old


def assert_same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert any(n.endswith(".safetensors") for n in names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.parametrize("src,dtype,tp,pp,kw", [
    (torch.float16, "float16", 2, 2, {}),
    (torch.bfloat16, "bfloat16", 2, 1, {}),
    (torch.float16, "float16", 4, 1, dict(num_key_value_heads=2, vocab_size=1001)),  # kv < tp
    (torch.bfloat16, "float16", 2, 1, {}),  # a cast: torch on both sides, same code
    (torch.float16, "float16", 2, 1, dict(family="mixtral")),  # router fp16 -> fp32 in numpy
])
def test_byte_copies_equal_torch_copies(tmp_path, monkeypatch, src, dtype, tp, pp, kw):
    hf = make(tmp_path, "hf", dtype=src, **kw)
    calls = []
    real = chunks._torch_view
    monkeypatch.setattr(chunks, "_torch_view", lambda *a: calls.append(1) or real(*a))
    convert_checkpoint(hf, tmp_path / "bytes", tp=tp, pp=pp, dtype=dtype, progress=False)
    torch_views = len(calls)
    _convert_torch_path(hf, tmp_path / "torch", tp=tp, pp=pp, dtype=dtype)
    assert len(calls) > torch_views  # the torch path went through torch
    assert_same_files(tmp_path / "bytes", tmp_path / "torch")
    if src == as_dtype(dtype).torch:
        assert torch_views == 0  # no cast but widening: slices, padding, router as numpy
