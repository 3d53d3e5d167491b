"""One rank's TensorRT-LLM int4 tensors of a planned linear weight whose pieces are a
pre-quantized source's virtual weights (convert/prequant/source.py): each piece (a slice of
output rows, or of input columns for a row-parallel linear; zero rows for padded heads) is cut
from the packed source (``convert.prequant.int4.slice_tensors``) and the pieces stacked along the
output rows, as the float plan stacks float rows."""
from __future__ import annotations

import re

import numpy as np
import torch

from common.errors import UserError
from convert.prequant.int4 import slice_tensors

_LAYER_WEIGHT = re.compile(r"^transformer\.layers\.\d+\..+\.weight$")


def _virtual(source, t) -> bool | None:
    """True: every piece of ``t`` is a packed linear's (or padding); False: none is; None:
    ``t`` is no 2-D tensor."""
    named = [p.source for p in t.pieces if p.source is not None]
    flags = {source.is_virtual(n) for n in named}
    if len(flags) > 1:
        raise UserError(f"{t.name} fuses packed and float linears of the source; a mixed "
                        f"pre-quantized model does not convert (one format per checkpoint)")
    return flags.pop() if flags else None


def stage(spec, source, t):
    """{suffix: (shape, dtype, compute)} for planned tensor ``t``, or None (not a linear)."""
    kind = _virtual(source, t)
    if not _LAYER_WEIGHT.match(t.name) or len(t.shape) != 2:
        if kind:
            raise UserError(f"{t.name} is int4-packed in the source; only the decoder layers' "
                            f"linears convert pre-quantized (the head and embedding in float)")
        return None
    if not kind:
        raise UserError(f"{t.name} is float in the pre-quantized source while other linears "
                        f"are packed: a mixed model does not convert (one format per checkpoint)")
    rows, cols = t.shape
    g = spec.group_size
    out = {"weight": ((rows // 2, cols), torch.int8),
           "weights_scaling_factor": ((rows, cols // g), torch.float32)}
    if spec.has_zero_point:
        out["zero"] = ((cols // g, rows), t.dtype.torch)
    cache = _Cache(spec, source, t)
    return {k: (shape, dtype, lambda k=k: cache.get(k)) for k, (shape, dtype) in out.items()}


class _Cache:
    """The tensors of one planned linear, computed once when the writer reaches the first."""

    def __init__(self, spec, source, t):
        self.spec, self.source, self.t, self.value = spec, source, t, None

    def get(self, suffix: str) -> torch.Tensor:
        if self.value is None:
            self.value = linear_tensors(self.spec, self.source, self.t)
        out = self.value.pop(suffix)
        if not self.value:
            self.value = None
        return out


def _piece(spec, source, p) -> dict:
    sq = spec.source_quant
    if p.pad_cols:
        raise UserError("head padding of a pre-quantized input does not convert (packed int4 "
                        "columns are not re-padded here); choose a --tp without --pad-heads")
    if p.source is None:  # padded heads: codes 8 (zero), scale 0
        r, c = p.shape
        return {"packed": np.full((r // 2, c), 0x00, np.uint8),
                "scale": np.zeros((r, c // sq.group_size), np.float32),
                "zero": np.full((r, c // sq.group_size), 8, np.int16)}
    out_f, in_f = source.shape(p.source)
    idx = tuple(p.index) + (slice(None),) * (2 - len(p.index))
    rows, cols = (slice(*s.indices(n)[:2]) for s, n in zip(idx, (out_f, in_f)))
    if (rows.stop - rows.start) % 2 or cols.start % sq.group_size or cols.stop % sq.group_size:
        raise UserError(f"{p.source}: this rank's slice (rows {rows.start}:{rows.stop}, columns "
                        f"{cols.start}:{cols.stop}) splits int4 pairs or groups; choose another --tp")
    return slice_tensors(source, sq, p.source[:-len("weight")], rows, cols)


def linear_tensors(spec, source, t) -> dict[str, torch.Tensor]:
    """The rank's ``weight`` / ``weights_scaling_factor`` [/ ``zero``] of planned weight ``t``."""
    parts = [_piece(spec, source, p) for p in t.pieces]
    packed = np.concatenate([p["packed"] for p in parts]) if len(parts) > 1 else parts[0]["packed"]
    scale = torch.from_numpy(np.concatenate([p["scale"] for p in parts]))
    out = {"weight": torch.from_numpy(packed.view(np.int8)), "weights_scaling_factor": scale}
    zeros = [p["zero"] for p in parts]
    if not spec.has_zero_point:
        if any(z is not None and (z != 8).any() for z in zeros):
            raise UserError(f"{t.name}: the source declares symmetric int4 but its zero points "
                            f"are not all 8; the quantization_config does not match the tensors")
        return out
    z = torch.from_numpy(np.concatenate(zeros).astype(np.float32))
    # scale * (8 - zero_point) is exact in float32 (11 + 4 bits), then rounded once
    out["zero"] = (scale * (8.0 - z)).to(t.dtype.torch).T.contiguous()
    return out
