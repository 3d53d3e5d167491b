"""DeepSeek-V3's release format made from a float model: block-scaled FP8 (``float8_e4m3fn``
weights + float32 ``weight_scale_inv`` per 128 x 128 block, ``quantization_config``
``{quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128], activation_scheme: dynamic}``),
as DeepSeek's ``inference/fp8_cast_bf16.py`` reads it back, and that dequantized copy. For the
``tiny-deepseek-v3-fp8`` example and the tests (torch; the converter's reader is numpy,
convert/block_fp8.py).

Quantized: every decoder linear (attention projections, dense MLP, routed and shared experts);
kept in bf16: the embedding, norms, the router, the head; the router's
``e_score_correction_bias`` in float32, as released."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from model.config import config_dict

BLOCK = (128, 128)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(BLOCK)}
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\..*proj(_with_mqa)?\.weight$")
_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def _blocks(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s`` [ceil(out/bo), ceil(in/bi)] expanded to ``x``'s [out, in]."""
    bo, bi = BLOCK
    return s.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:x.shape[0], :x.shape[1]]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 weight_scale_inv): each block's amax / 448."""
    bo, bi = BLOCK
    w = w.float()
    out, inp = w.shape
    pad = torch.zeros(-(-out // bo) * bo, -(-inp // bi) * bi)
    pad[:out, :inp] = w.abs()
    amax = pad.reshape(pad.shape[0] // bo, bo, pad.shape[1] // bi, bi).amax(dim=(1, 3))
    s = (amax / _E4M3_MAX).clamp(min=1e-12)
    return (w / _blocks(w, s)).to(torch.float8_e4m3fn), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """fp8_cast_bf16.py's weight_dequant: ``q * s`` per block in float32, then the dtype."""
    return (q.float() * _blocks(q, s)).to(dtype)


def _copy_dir(src: Path, dst: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer and generation files
        if f.is_file() and not f.name.endswith(".safetensors") and \
                f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def make_block_fp8(src, dst) -> Path:
    """``src`` (a float model directory) in DeepSeek-V3's release format at ``dst``."""
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    out = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if _LINEAR.match(name):
            out[name], out[name[:-len("weight")] + "weight_scale_inv"] = quantize(t)
        else:
            keep = name.endswith("e_score_correction_bias")
            out[name] = t.to(torch.float32 if keep else torch.bfloat16).contiguous()
    config = dict(config_dict(src), dtype="bfloat16", quantization_config=QUANTIZATION_CONFIG)
    _copy_dir(src, dst, out, config)
    return dst


def dequantized_copy(src, dst) -> Path:
    """Block-scaled fp8 ``src`` dequantized to bf16 at ``dst`` (fp8_cast_bf16.py's result:
    ``weight_scale_inv`` dropped, ``quantization_config`` removed)."""
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    t = load_file(str(src / "model.safetensors"))
    out = {n: (dequantize(v, t[n[:-len("weight")] + "weight_scale_inv"])
               if v.dtype == torch.float8_e4m3fn else v)
           for n, v in t.items() if not n.endswith("weight_scale_inv")}
    config = dict(config_dict(src))
    config.pop("quantization_config")
    _copy_dir(src, dst, out, config)
    return dst
