"""``--target pytorch`` of a symmetric pre-quantized int4 input: modelopt 0.47's unified
``W4A16_AWQ`` checkpoint (what quantize/unified/ writes for ``--awq``, read by TensorRT-LLM's
PyTorch backend and by verify/unified_reader.py), the source's codes and scales as they are:

* each packed linear ``P``: ``P.weight`` uint8 [out/2, in] (two signed int4 a byte along the
  output, low nibble = even row: the same bytes as the engine target's), ``P.weight_scale``
  float32 [out, in/g] (the source's scales, exact);
* ``pre_quant_scale``: an AWQ export folds the q/k/v and gate/up ones into the norms and keeps
  ``o_proj`` / ``down_proj``'s; a GPTQ / AWQ / compressed-tensors source has none (identity),
  so the norms are copied as they are and ``o_proj`` / ``down_proj`` carry ones (model dtype);
* every other tensor copied from the source in its dtype; config.json = the source's with
  modelopt's ``quantization_config``; ``hf_quant_config.json``; the tokenizer files.

An asymmetric source is refused: modelopt's unified W4A16_AWQ has no zero points. A per-tensor fp8
source with static input scales writes modelopt's unified FP8: the e4m3 weights copied, each
linear's ``weight_scale`` and ``input_scale`` as float32 scalars (each linear keeps its own, as
modelopt's FP8 export; TensorRT-LLM's PyTorch backend takes the max over fused q/k/v when it
loads). numpy only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from common.atomic import write_text
from common.dtypes import BY_NAME
from common.errors import UserError, naming
from common.staged import StagedOutput
from convert.casts import to_float32
from convert.chunks import iter_chunks
from convert.prequant.int4 import slice_tensors
from convert.prequant.source import PACKED, PrequantSource
from convert.shard import Piece
from convert.source_files import declared_dtype
from convert.writer import write_file

from .weights import ComputedTensor

#: the tokenizer / generation files the directory needs to serve on its own
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
#: the linears whose pre_quant_scale an AWQ export keeps (the others are folded into norms)
KEEPS_PRE_QUANT_SCALE = ("self_attn.o_proj", "mlp.down_proj")


class _Copied:
    """A source tensor copied as it is."""

    pieces = ()

    def __init__(self, source, name: str):
        self.source, self.name = source, name
        self.shape, self.dtype = tuple(source.shape(name)), source.dtype(name)

    def chunks(self):
        yield from iter_chunks(self.source, Piece(self.name, (), self.shape), self.dtype)


def _linear_entries(source, sq, prefix: str, model_dtype) -> list:
    out_f, in_f = source.shape(prefix + "weight")
    g = sq.group_size
    cache: dict = {}

    def load(k):
        if not cache:
            t = slice_tensors(source, sq, prefix, slice(0, out_f), slice(0, in_f))
            if t["zero"] is not None and (t["zero"] != 8).any():
                raise UserError(f"{prefix}weight: the source declares symmetric int4 but its zero "
                                f"points are not all 8")
            cache.update(weight=t["packed"], weight_scale=t["scale"])
        return cache.pop(k)

    entries = [ComputedTensor(prefix + "weight", (out_f // 2, in_f), BY_NAME["uint8"],
                              lambda: load("weight")),
               ComputedTensor(prefix + "weight_scale", (out_f, in_f // g), BY_NAME["float32"],
                              lambda: load("weight_scale"))]
    if prefix.rstrip(".").endswith(KEEPS_PRE_QUANT_SCALE):
        ones = np.ones(in_f, np.float32)
        bits = np.empty(in_f, dtype={2: np.uint16, 4: np.uint32}[model_dtype.itemsize])
        from convert.casts import float32_into

        float32_into(ones, model_dtype, bits)
        entries.append(ComputedTensor(prefix + "pre_quant_scale", (in_f,), model_dtype,
                                      lambda b=bits: b))
    return entries


def _scalar(source, name: str) -> ComputedTensor:
    """A per-tensor fp8 scale ([1] or [] in the source) as modelopt writes it: float32 []."""
    def load():
        v = to_float32(source.read_bits(name), source.dtype(name)).reshape(-1)
        if v.size != 1:
            raise UserError(f"{name} has {v.size} values; a per-tensor scale has one")
        return np.ascontiguousarray(v[0], dtype=np.float32)
    return ComputedTensor(name, (), BY_NAME["float32"], load)


def _fp8_entries(source) -> list:
    """Per-tensor fp8: the weights copied, each linear's weight / input scale as a float32
    scalar, the rest copied."""
    out = []
    for n in source.meta:
        linear = n.rpartition(".")[0] + ".weight"
        scalar = n.endswith((".weight_scale", ".input_scale")) and source.is_virtual(linear)
        out.append(_scalar(source, n) if scalar else _Copied(source, n))
    return sorted(out, key=lambda e: e.name)


def _entries(source, sq, model_dtype) -> list:
    if sq.fp8:
        return _fp8_entries(source)
    parts = {f"{p}.{x}" for p in (n.rpartition(".")[0] for n in source.virtual)
             for leaf in PACKED.values() for x in leaf}
    out = [_Copied(source, n) for n in source.meta if n not in parts]
    for name in source.virtual:
        out += _linear_entries(source, sq, name[:-len("weight")], model_dtype)
    return sorted(out, key=lambda e: e.name)


def write_prequantized_unified(model_dir, out_dir, spec, hf_quant: dict, config: dict, *,
                               force: bool = False, digests=None, promote: bool = True) -> None:
    """The unified checkpoint of pre-quantized ``model_dir`` in ``out_dir`` (staged as
    quantize/unified's: ``out_dir.partial`` until complete; ``promote=False`` leaves it there)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose another --output or pass --force to "
                        f"replace it")
    sq = spec.source_quant
    model_dtype = BY_NAME[declared_dtype(config) or "float16"]
    source = PrequantSource(model_dir, sq, declared_dtype(config))
    staged = StagedOutput(out_dir)
    try:
        staged.open(None, resume=False)
        entries = _entries(source, sq, model_dtype)
        write_file(staged.stage / "model.safetensors", entries, lambda e: e.chunks(),
                   digests=digests)
        write_text(staged.stage / "config.json", json.dumps(config, indent=4) + "\n")
        write_text(staged.stage / "hf_quant_config.json", json.dumps(hf_quant, indent=4))
        for f in COPIED_FILES:
            if (model_dir / f).is_file():
                with naming(staged.stage / f):
                    shutil.copyfile(model_dir / f, staged.stage / f)
        if promote:
            staged.promote(digests)
    except BaseException:
        staged.discard()
        raise
    finally:
        source.close()
