"""The per-weight arithmetic of TensorRT-LLM's plugin SmoothQuant, for one linear: ``smooth_gemm``'s
smoother, ``apply_smoothing``'s ``W * s`` (float64, stored in the weight's dtype) and
``generate_int8``'s int8 weights and scales (``tensorrt_llm/models/llama/convert.py``,
``models/convert_utils.py``, 1.2 era).

Why it is written this way: at 8B shapes one layer's float32 weights are 0.87 GB, and the formulas
as written (a float64 copy, the smoothed copy, an ``abs`` copy for the row maxima, then divide,
round, clamp and cast, each a full-size temporary) were ~15 passes over memory per weight: most of
a layer's calibration time on a CPU. Here a weight is read from memory twice: once for its column
maxima (the smoother), once for a pass that smooths, takes the row maxima and rounds to int8 one
cache-sized block of rows at a time. The smoothed float weight is never stored; a per-tensor int8
weight (its scale is a maximum over all rows) smooths each block again in a second pass. The same
operations on the same values in the same precision, so the same bits: element-wise operations
and maxima do not depend on how the rows are blocked (tests/test_sq_plugin_layerwise.py runs the
layer-wise path with a different block size than the whole-model path it is compared with).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

#: elements per block of the fused passes: 2 MB of float32 (4 MB of float64), within the cache,
#: so the passes after the first read of a block do not go to memory (8B-shaped layer, 2 cores:
#: 2^19 0.27-0.36 s, 2^18 0.32-0.43 s, 2^16 0.49 s, 2^21 0.55 s). Every block-sized
#: temporary is a scratch buffer allocated once per weight: a fresh 2 MB tensor per block is an
#: mmap and 512 page faults whenever glibc's mmap threshold is below it (measured: 4x the time)
BLOCK_ELEMENTS = 1 << 19


def _rows_per_block(cols: int) -> int:
    return max(1, BLOCK_ELEMENTS // cols)


def column_absmax(weights: list[Tensor]) -> Tensor:
    """max |W[:, j]| over the rows of every weight in ``weights`` jointly (float32 [in])."""
    out = None
    for w in weights:
        n = _rows_per_block(w.shape[1])
        scratch = torch.empty((min(n, w.shape[0]), w.shape[1]), dtype=w.dtype, device=w.device)
        for a in range(0, w.shape[0], n):
            b = w[a:a + n]
            m = torch.abs(b, out=scratch[:b.shape[0]]).amax(dim=0)
            out = m if out is None else torch.maximum(out, m)
    return out


def smoother_from_absmax(wmax: Tensor, x: Tensor, alpha: float) -> Tensor:
    """``smooth_gemm``: s_j = clamp(x_j^alpha / wmax_j^(1 - alpha), min=1e-5), float64 (``wmax``:
    :func:`column_absmax` of the weights the smoother is shared by)."""
    return (x.to(torch.float64).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


@dataclass
class Lin:
    """One quantizable linear after smoothing: its weight is ``parts`` stacked by rows (q, k, v for
    qkv; one part otherwise; float [out_i, in], unsmoothed) times the float64 smoother ``s`` per
    input column (None: ``parts`` are the weight as is), computed as it is quantized. ``x``: input
    maxima divided by the smoother (float64); ``y``: output maxima; ``sections``: the output widths
    of q/k/v (qkv only). A layer read back from the calibration store (quantize/sq_layerwise.py)
    has its int8 form only: no ``parts`` and ``x``, and ``y`` is qkv's maximum."""

    parts: tuple[Tensor, ...] | None
    x: Tensor | None
    y: Tensor | None
    sections: tuple[int, ...] | None = None
    s: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]


def smoothed_blocks(lin: Lin) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows of the smoothed weight) in row order, float32 of ``apply_smoothing``'s
    ``(W.double() * s).to(W.dtype)``; a block is overwritten by the next one."""
    row = 0
    for w in lin.parts:
        n = _rows_per_block(w.shape[1])
        if lin.s is not None:
            shape = (min(n, w.shape[0]), w.shape[1])
            wide = torch.empty(shape, dtype=torch.float64, device=w.device)
            narrow = torch.empty(shape, dtype=w.dtype, device=w.device)
        for a in range(0, w.shape[0], n):
            b = w[a:a + n]
            if lin.s is not None:
                k = b.shape[0]
                torch.mul(b, lin.s, out=wide[:k])  # float32 x float64: computed in float64
                narrow[:k].copy_(wide[:k])
                b = narrow[:k]
            yield row + a, b.float()
        row += w.shape[0]


@dataclass
class Int8Linear:
    """``generate_int8`` of one linear, in [out, in] orientation (TensorRT-LLM's ``.t()`` of it).

    ``w_col`` / ``w_tensor``: int8 weights quantized per output channel / per tensor (qkv: per q, k, v);
    ``*_c`` / ``*_t``: per-output-channel scales (float32, [out]) for the same two choices;
    ``x_scale`` = 127 / max x, ``y_scale`` = max y / 127 (float32 scalars)."""

    w_col: Tensor | None
    w_tensor: Tensor | None
    w_quant_orig_c: Tensor
    w_quant_orig_t: Tensor
    y_accum_quant_c: Tensor
    y_accum_quant_t: Tensor
    x_orig_quant: Tensor
    y_quant_orig: Tensor


def _rdiv(c: float, t: Tensor) -> Tensor:
    """c / t correctly rounded (torch's ``c / t`` is ``t.reciprocal() * c``: two roundings)."""
    return torch.div(torch.full_like(t, c), t)


def _to_i8(b: Tensor, scale: Tensor, divide: bool, tmp: Tensor, out: Tensor) -> None:
    """``out = int8(clamp(round(b / scale[:, None] (or *)), -127, 127))``, round half to even as
    numpy's, through the float32 scratch ``tmp``."""
    (torch.div if divide else torch.mul)(b, scale[:, None], out=tmp)
    tmp.round_().clamp_(-127, 127)
    out.copy_(tmp)


def int8_linear(lin: Lin, mha: bool = False, only: str | None = None) -> Int8Linear:
    """``generate_int8``: int8 weights (per channel and per tensor) and the scales of both activation
    modes. qkv (``lin.sections``): per tensor means one scale each for q, k and v. ``mha``: the qkv
    of a model with as many kv heads as heads (TensorRT-LLM's multi_query_mode=False branch, which
    multiplies by 127/wmax where the GQA branch divides by wmax/127). ``only`` ``"col"`` or
    ``"tensor"``: that int8 weight only (the other is None)."""
    rows, cols = lin.shape
    device = lin.parts[0].device
    wmax = torch.empty(rows, dtype=torch.float32, device=device)     # per output channel
    w_c = None if only == "tensor" else torch.empty((rows, cols), dtype=torch.int8, device=device)
    tmp = torch.empty((min(rows, _rows_per_block(cols)), cols), dtype=torch.float32, device=device)
    for a, b in smoothed_blocks(lin):               # pass 1: row maxima, the per-channel weight
        k = b.shape[0]
        torch.amax(torch.abs(b, out=tmp[:k]), dim=1, out=wmax[a:a + k])
        if w_c is not None:
            _to_i8(b, _rdiv(127.0, wmax[a:a + k]), False, tmp[:k], w_c[a:a + k])
    if lin.sections:
        parts = wmax.split(list(lin.sections))
        wmax_t = torch.cat([p.max().expand(p.numel()) for p in parts])
    else:
        wmax_t = wmax.max().expand(wmax.numel())
    orig_quant_c = _rdiv(127.0, wmax)                            # float32, as numpy's 127. / array
    orig_quant_t = _rdiv(127.0, wmax_t)
    quant_orig_c = _rdiv(1.0, orig_quant_c)
    quant_orig_t = _rdiv(1.0, orig_quant_t)
    w_t = None
    if only != "col":                               # pass 2: the per-tensor weight
        divide = bool(lin.sections) and not mha
        scale = quant_orig_t if divide else orig_quant_t
        w_t = torch.empty((rows, cols), dtype=torch.int8, device=device)
        for a, b in smoothed_blocks(lin):
            k = b.shape[0]
            _to_i8(b, scale[a:a + k], divide, tmp[:k], w_t[a:a + k])
    x_oq = 127.0 / float(lin.x.max())
    y_oq = 127.0 / float(lin.y.max())
    return Int8Linear(
        w_col=w_c, w_tensor=w_t,
        w_quant_orig_c=quant_orig_c, w_quant_orig_t=quant_orig_t,
        y_accum_quant_c=(y_oq / (x_oq * orig_quant_c.double())).float(),
        y_accum_quant_t=(y_oq / (x_oq * orig_quant_t.double())).float(),
        x_orig_quant=torch.tensor(x_oq, dtype=torch.float32),
        y_quant_orig=torch.tensor(float(lin.y.max()) / 127.0, dtype=torch.float32),
    )
