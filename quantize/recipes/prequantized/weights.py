"""One rank's TensorRT-LLM int4 tensors of each planned linear weight whose pieces are a
pre-quantized source's virtual weights (convert/prequant/source.py): each piece (a slice of
output rows, or of input columns for a row-parallel linear; zero rows for padded heads) is cut
from the packed source (``convert.prequant.int4.slice_tensors``) and the pieces stacked along the
output rows, as the float plan stacks float rows. numpy only: a pre-quantized conversion imports
no torch, as the float path."""
from __future__ import annotations

import re

import numpy as np

from common.dtypes import BY_NAME
from common.errors import UserError
from convert.casts import UINT, float32_into
from convert.chunks import ByteChunk
from convert.prequant.int4 import slice_tensors

_LAYER_WEIGHT = re.compile(r"^transformer\.layers\.\d+\..+\.weight$")


class ComputedTensor:
    """A rank tensor computed when the writer reaches it (``load`` -> numpy array of its bytes)."""

    pieces = ()

    def __init__(self, name: str, shape: tuple[int, ...], dtype, load):
        self.name, self.shape, self.dtype, self._load = name, tuple(shape), dtype, load

    def chunks(self):
        data = np.ascontiguousarray(self._load())
        yield ByteChunk(memoryview(data.reshape(-1).view(np.uint8)), self.dtype)


def stage_plans(cplan, spec, stage_one) -> None:
    """Replace, in every rank's plan, each planned quantized linear weight by the entries
    ``stage_one(spec, source, t)`` gives (None: ``t`` kept)."""
    out = []
    for plan in cplan.plans:
        new = []
        for t in plan:
            made = stage_one(spec, cplan.source, t)
            new += [t] if made is None else made
        new.sort(key=lambda t: t.name)
        out.append(new)
    cplan.plans = out


def check_linear(source, t) -> bool:
    """Whether planned ``t`` is a decoder layer's quantized linear weight (False: a float
    tensor, kept); a quantized head or embedding, or a float linear among quantized ones
    (a mixed model), refused."""
    flags = {source.is_virtual(p.source) for p in t.pieces if p.source is not None}
    if len(flags) > 1:
        raise UserError(f"{t.name} fuses quantized and float linears of the source; a mixed "
                        f"pre-quantized model does not convert (one format per checkpoint)")
    quantized = flags.pop() if flags else None
    if not _LAYER_WEIGHT.match(t.name) or len(t.shape) != 2:
        if quantized:
            raise UserError(f"{t.name} is quantized in the source; only the decoder layers' "
                            f"linears convert pre-quantized (the head and embedding in float)")
        return False
    if not quantized:
        raise UserError(f"{t.name} is float in the pre-quantized source while other linears "
                        f"are quantized: a mixed model does not convert (one format per "
                        f"checkpoint)")
    return True


def stage(spec, source, t) -> list | None:
    """The entries replacing planned tensor ``t`` (an int4 linear's weight), or None."""
    if not check_linear(source, t):
        return None
    rows, cols = t.shape
    g = spec.group_size
    out = {"weight": ((rows // 2, cols), BY_NAME["int8"]),
           "weights_scaling_factor": ((rows, cols // g), BY_NAME["float32"])}
    if spec.has_zero_point:
        out["zero"] = ((cols // g, rows), t.dtype)
    cache = _Cache(spec, source, t)
    prefix = t.name[:-len("weight")]
    return [ComputedTensor(prefix + k, shape, dtype, lambda k=k: cache.get(k))
            for k, (shape, dtype) in out.items()]


class _Cache:
    """The tensors of one planned linear, computed once when the writer reaches the first."""

    def __init__(self, spec, source, t):
        self.spec, self.source, self.t, self.value = spec, source, t, None

    def get(self, suffix: str) -> np.ndarray:
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
    if p.source is None:  # padded heads: codes 0 (signed), scale 0
        r, c = p.shape
        return {"packed": np.zeros((r // 2, c), np.uint8),
                "scale": np.zeros((r, c // sq.group_size), np.float32),
                "zero": np.full((r, c // sq.group_size), 8, np.int16)}
    out_f, in_f = source.shape(p.source)
    idx = tuple(p.index) + (slice(None),) * (2 - len(p.index))
    rows, cols = (slice(*s.indices(n)[:2]) for s, n in zip(idx, (out_f, in_f)))
    if (rows.stop - rows.start) % 2 or cols.start % sq.group_size or cols.stop % sq.group_size:
        raise UserError(f"{p.source}: this rank's slice (rows {rows.start}:{rows.stop}, columns "
                        f"{cols.start}:{cols.stop}) splits int4 pairs or groups; choose another --tp")
    return slice_tensors(source, sq, p.source[:-len("weight")], rows, cols)


def linear_tensors(spec, source, t) -> dict[str, np.ndarray]:
    """The rank's ``weight`` (int8 bytes) / ``weights_scaling_factor`` (float32) [/ ``zero``,
    the model dtype's bits] of planned weight ``t``."""
    parts = [_piece(spec, source, p) for p in t.pieces]
    cat = (lambda k: np.concatenate([p[k] for p in parts])) if len(parts) > 1 else \
        (lambda k: parts[0][k])
    out = {"weight": cat("packed"), "weights_scaling_factor": cat("scale")}
    if not spec.has_zero_point:
        if any(p["zero"] is not None and (p["zero"] != 8).any() for p in parts):
            raise UserError(f"{t.name}: the source declares symmetric int4 but its zero points "
                            f"are not all 8; the quantization_config does not match the tensors")
        return out
    # scale * (8 - zero_point) is exact in float32 (11 + 4 bits), then rounded once
    zero = (out["weights_scaling_factor"] * (8.0 - cat("zero").astype(np.float32))).T
    bits = np.empty(zero.shape, UINT[t.dtype.itemsize])
    float32_into(np.ascontiguousarray(zero, dtype=np.float32), t.dtype, bits)
    out["zero"] = bits
    return out
