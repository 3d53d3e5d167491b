"""The synthetic Hugging Face Llama checkpoints of the conversion benchmarks: real layer shapes
(7B, 8B, 70B, fewer layers), random weights, written tensor by tensor into ~2 GB safetensors shards
with a ``model.safetensors.index.json`` and a transformers ``LlamaConfig``; never held in memory."""
from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass
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
    from quantize.torch_io import torch_chunks  # produce yields torch tensors

    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(out / fname, shard, torch_chunks(produce))
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


def write_repeated(out: Path, tensors, dtype, shard_gb: float = 2.0) -> int:
    """Write ``tensors`` ((name, shape) pairs) of ``dtype`` as a sharded HF model into ``out``:
    1-D tensors ones, the others rows of one random 16 MB block repeated from a per-name offset
    (generating gigabytes of normals would take minutes); return the bytes written."""
    import torch

    from convert.writer import nbytes

    elem = dtype  # a class body sees the enclosing function's names, but not one it assigns

    @dataclass
    class T:
        name: str
        shape: tuple
        dtype: object = elem

    shards, cur, size_now = [], [], 0
    for name, shape in tensors:
        size = nbytes(shape, dtype)
        if cur and size_now + size > shard_gb * 2**30:
            shards.append(cur)
            cur, size_now = [], 0
        cur.append(T(name, tuple(shape)))
        size_now += size
    shards.append(cur)
    block = torch.randn(8 * 2**20).mul_(0.02).to(dtype)

    def produce(t):
        if len(t.shape) == 1:
            yield torch.ones(t.shape, dtype=dtype)
            return
        rows, cols = t.shape
        shift = zlib.crc32(t.name.encode()) % 4096
        step = max(1, (block.numel() - shift) // cols)
        for a in range(0, rows, step):
            n = min(step, rows - a)
            yield block[shift:shift + n * cols].view(n, cols)

    return write_shards(out, shards, produce)
