"""A PEFT LoRA adapter converted to TensorRT-LLM's request / prefetch tensors, one module at a time.

``model.lora_weights.npy`` [1, rows, max row]: each row is one (layer, module): A [r, in] then B
[out, r], row-major, flattened, zero padded to the longest row; the scale (alpha / r, or rsLoRA's
alpha / sqrt(r)) is folded into B. ``model.lora_config.npy`` [1, rows, 3] int32: (module id,
layer, r). This is what ``examples/hf_lora_convert.py`` writes and ``LoraCache::copyToPages``
(cpp/tensorrt_llm/runtime/loraCache.cpp) reads: it views a row as A [r, inDim] and B [outDim, r]
with the engine's global dims, and per tp rank copies the contiguous slice of A's columns
(row-parallel modules) or of B's rows (the others). So B's rows and A's columns are laid out here
as the checkpoint lays out the linear's weight: each rank's slice (padded heads zero, a duplicated
kv head repeated) one after the other, with the shard rules' head layout (convert.shard).

The weights are in the engine's dtype; bfloat16 keeps its bits (numpy has no bfloat16: the array is
``|V2``, TensorRT-LLM's ``torch_to_numpy`` form), never a float16 cast. Memory: one module's A and
B in float32 at a time, and one output row; rows are appended to the file in order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.dtypes import DType
from model.lora import MODULE_IDS, QKV, SPLIT_IN, module_dims, targets

from .casts import UINT, float32_into, to_float32
from .shard import kv_heads_for_rank

WEIGHTS, CONFIG = "model.lora_weights.npy", "model.lora_config.npy"
#: the .npy dtype of each engine dtype (bfloat16: its raw bits, see the module docstring)
NPY_DTYPE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": np.dtype("V2")}


def rows(adapter, family) -> list[tuple[int, str, str | None]]:
    """(layer, TensorRT-LLM module, HF module or None: a zero-filled q/k/v) of every row."""
    table = targets(family)
    by_module = {t.module: hf for hf, t in table.items()}
    out = []
    for layer in adapter.layers:
        have = {hf for (lay, hf) in adapter.tensors if lay == layer}
        mods = {table[hf].module for hf in have}
        if mods & set(QKV):
            mods |= set(QKV)  # LoraManager.get_missing_qkv_modules: zeros
        for m in MODULE_IDS:
            if m in mods:
                hf = by_module[m]
                out.append((layer, m, hf if hf in have else None))
    return out


def _segments(module: str, shape, tp: int) -> list[tuple[int, int, int]]:
    """The split axis of ``module`` in the engine's global layout: per rank, (start, stop) of the
    HF features it holds and the zero features after them."""
    hd, segs = shape.head_size, []
    for t in range(tp):
        if module in ("attn_q", "attn_dense"):
            per = shape.tp_heads // tp
            heads, real = range(t * per, (t + 1) * per), shape.heads
        elif module in ("attn_k", "attn_v"):
            heads, real = kv_heads_for_rank(shape.tp_kv_heads, tp, t), shape.kv_heads
        else:  # the MLP's intermediate features (not padded: see pipeline.lora)
            k = shape.inter // tp
            segs.append((t * k, (t + 1) * k, 0))
            continue
        stop = min(heads.stop, real)
        a, b = heads.start * hd, max(heads.start, stop) * hd
        segs.append((a, b, (len(heads) - (b - a) // hd) * hd))
    return segs


def engine_layout(module: str, a: np.ndarray, b: np.ndarray, shape, tp: int):
    """A [r, in] and B [out, r] (HF features) in the engine's global layout."""
    segs = _segments(module, shape, tp)
    if module in SPLIT_IN:
        parts = []
        for s, e, pad in segs:
            parts += [a[:, s:e], np.zeros((a.shape[0], pad), np.float32)]
        return np.concatenate(parts, axis=1), b
    parts = []
    for s, e, pad in segs:
        parts += [b[s:e], np.zeros((pad, b.shape[1]), np.float32)]
    return a, np.concatenate(parts, axis=0)


def _read(adapter, name: str) -> np.ndarray:
    """One tensor of the adapter as float32 (bit for bit torch's cast)."""
    from common.safetensors_header import read_header, tensor_span

    header, base = read_header(adapter.weights)
    begin, end, dtype = tensor_span(adapter.weights, name, header[name])
    with open(adapter.weights, "rb") as f:
        f.seek(base + begin)
        bits = np.frombuffer(f.read(end - begin), UINT[dtype.itemsize])
    return to_float32(bits, dtype).reshape(header[name]["shape"])


def convert_adapter(adapter, family, shape, tp: int, dtype: DType, out_dir: Path) -> dict:
    """Write ``out_dir``/model.lora_weights.npy and model.lora_config.npy for ``adapter``
    (model.lora.Adapter) and an ``adapter.json`` record; returns the record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = rows(adapter, family)
    width = max(adapter.rank * sum(module_dims(m, shape, tp)) for _, m, _ in plan)
    config = np.zeros((1, len(plan), 3), np.int32)
    r = adapter.rank
    row = np.zeros(width, UINT[dtype.itemsize])
    with open(out_dir / WEIGHTS, "wb") as f:  # rows appended in order: one row in memory
        np.lib.format.write_array_header_2_0(f, {
            "descr": np.lib.format.dtype_to_descr(NPY_DTYPE[dtype.torch_name]),
            "fortran_order": False, "shape": (1, len(plan), width)})
        for i, (layer, module, hf) in enumerate(plan):
            fin, fout = module_dims(module, shape, tp)
            row[:] = 0
            if hf is not None:
                a_name, b_name = adapter.tensors[(layer, hf)]
                b = _read(adapter, b_name) * np.float32(adapter.scale)
                a, b = engine_layout(module, _read(adapter, a_name), b, shape, tp)
                float32_into(np.ascontiguousarray(a).reshape(-1), dtype, row[:r * fin])
                float32_into(np.ascontiguousarray(b).reshape(-1), dtype,
                             row[r * fin:r * (fin + fout)])
            f.write(row.tobytes())
            config[0, i] = (MODULE_IDS[module], layer, r)
    np.save(out_dir / CONFIG, config)
    record = {**adapter.record(), "engine_dtype": dtype.torch_name, "rows": len(plan),
              "max_row": width, "tp": tp}
    (out_dir / "adapter.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
