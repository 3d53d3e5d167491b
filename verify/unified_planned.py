"""Unified checkpoints of the multi-head-latent-attention families (DeepSeek-V3) for the CPU
reference reader.

A float unified checkpoint of such a family holds the Hugging Face tensors as they are. The
reader runs MLA in TensorRT-LLM's DeepSeek form (verify/mla.py: ``fused_a``, the absorbed
``fused_q_proj``, ``kv_b_proj`` per head, the experts stacked, the router in float32, and
DeepSeek-V3's ``e_score_correction_bias``), which is exactly what the family's float plan lays out
from those names (``convert.plan.rank_plan`` at tp 1, the spec's rules, ``convert.compute`` for
the absorbed projection in float32). So the checkpoint is read through that plan, into memory,
with the config the family's ``trtllm_config`` writes (DeepSeek-V3: ``noaux_tc`` routing,
model/families/deepseek_v3.py ``reader_fields``) — one mapping for both targets instead of a
second hand-written one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

Tensor = torch.Tensor
#: run in the checkpoint's own dtype (a float32 unified checkpoint in float32)
_DTYPES = ("float16", "bfloat16", "float32")


def is_planned(d) -> bool:
    """Whether unified checkpoint ``d`` is read through its family's plan: a family whose layer
    holds tensors the plan computes (MLA's absorbed projection, convert.compute)."""
    from convert.compute import COMPUTED
    from model.config import config_dict
    from model.families import ARCHITECTURES, FAMILIES

    try:
        arch = (config_dict(d).get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError):
        return False
    family = FAMILIES.get(ARCHITECTURES.get(arch)) if isinstance(arch, str) else None
    return family is not None and any(r.shard in COMPUTED for r in family.layer)


def _bytes(chunk) -> bytes:
    if hasattr(chunk, "fd"):  # a FileSpan: bytes of the source file
        return os.pread(chunk.fd, chunk.nbytes, chunk.offset)
    return bytes(chunk.data)


def _tensor(source, t) -> Tensor:
    from convert.chunks import iter_chunks
    from convert.compute import computed_chunks

    if t.compute is not None:
        chunks = computed_chunks(source, t)
    else:
        chunks = (c for p in t.pieces
                  for c in iter_chunks(source, p, t.dtype, offset=t.offset, scale=t.scale))
    raw = np.frombuffer(b"".join(_bytes(c) for c in chunks), dtype=np.uint8)
    return torch.from_numpy(raw.copy()).view(t.dtype.torch).reshape(t.shape)


def load_planned(ckpt_dir) -> tuple[dict, list[dict[str, Tensor]]]:
    """(TensorRT-LLM config dict, [rank-0 tensors]) of float unified checkpoint ``ckpt_dir``."""
    from convert.hf_config import from_hugging_face
    from convert.plan import rank_plan
    from convert.source import SourceCheckpoint
    from model.source import ModelSource

    d = Path(ckpt_dir)
    if (d / "hf_quant_config.json").is_file():
        raise UserError(f"{d}: quantized unified checkpoints of multi-head latent attention "
                        f"are not supported by the reference reader")
    model = ModelSource.open(d)
    hf, shape = model.config, model.shape
    declared = str(getattr(hf, "dtype", None) or "").removeprefix("torch.")
    config = from_hugging_face(hf, dtype=declared if declared in _DTYPES else "auto", tp=1, pp=1)
    source = SourceCheckpoint(d)
    try:
        plan = rank_plan(shape, source, tp=1, pp=1, rank=0, dtype=config["dtype"])
        return config, [{t.name: _tensor(source, t) for t in plan}]
    finally:
        source.close()
