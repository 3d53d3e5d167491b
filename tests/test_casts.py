"""convert.casts (numpy, on raw bits) gives bit for bit what torch's ``Tensor.to`` gives on CPU for
every floating source dtype to float32 / float16 / bfloat16: every code of the 1- and 2-byte dtypes,
and for float32 / float64 random values plus the edge cases (ties, overflow to Inf, the largest
finite values, subnormals, signed zeros, Inf, quiet and signalling NaNs with payloads)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.dtypes import BY_ST
from common.errors import UserError
from convert.casts import UINT, cast

SOURCES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
TARGETS = ["F32", "F16", "BF16"]
_SIGNED = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_EDGES = {
    4: [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF, 0x7F812345,
        0x7F800000, 0xFF800000, 0, 0x80000000, 1, 0x80000001, 0x7F7FFFFF, 0xFF7FFFFF,
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FFFFF,  # around float16's max (65504)
        0x33000000, 0x33000001, 0x33800000, 0x387FC000,  # float16's subnormals
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF],  # bfloat16 ties and neighbours
    8: [0x7FF8000000000000, 0xFFF8000000000001, 0x7FF0000000000001, 0x7FF0000000000000,
        0, 1, 0x8000000000000000, 0x3FF0000010000000, 0x3FF0000030000000, 0x47EFFFFFF0000000],
}


def codes(st: str) -> np.ndarray:
    d = BY_ST[st]
    u = UINT[d.itemsize]
    if d.itemsize <= 2:
        return np.arange(256 ** d.itemsize, dtype=u)
    rng = np.random.default_rng(0)
    values = rng.standard_normal(50_000) * np.exp2(rng.integers(-30, 30, 50_000))
    random_bits = rng.integers(0, np.iinfo(u).max, 50_000, dtype=u, endpoint=True)
    as_src = values.astype(np.float32 if d.itemsize == 4 else np.float64).view(u)
    return np.concatenate([np.array(_EDGES[d.itemsize], u), as_src, random_bits])


def torch_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    s, d = BY_ST[src], BY_ST[dst]
    t = torch.from_numpy(bits.view(_SIGNED[s.itemsize]).copy()).view(s.torch)
    return t.to(d.torch).view(torch.int16 if d.itemsize == 2 else torch.int32).numpy() \
        .view(UINT[d.itemsize])


@pytest.mark.parametrize("src", SOURCES)
@pytest.mark.parametrize("dst", TARGETS)
def test_cast_equals_torch_bit_for_bit(src, dst):
    bits = codes(src)
    got, want = cast(bits, BY_ST[src], BY_ST[dst]), torch_cast(bits, src, dst)
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        # torch's scalar kernels write other NaN bits (bfloat16 0x7FC0): compare NaN-ness there
        nan = np.isnan(torch_cast(want, dst, "F32").view(np.float32))
        assert (np.isnan(torch_cast(got, dst, "F32").view(np.float32)) == nan).all()
        got, want = got[~nan], want[~nan]
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


def test_a_cast_keeps_the_shape_and_a_strided_out():
    from convert.casts import cast_into

    x = torch.randn(6, 10).to(torch.bfloat16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    out = np.zeros((6, 12), np.uint16)
    cast_into(bits[:, 2:9], BY_ST["BF16"], BY_ST["F16"], out[:, :7])  # column slices, as chunks
    assert np.array_equal(out[:, :7], x[:, 2:9].half().view(torch.int16).numpy().view(np.uint16))
    assert not out[:, 7:].any()


def test_non_float_casts_are_refused():
    with pytest.raises(UserError, match="cannot cast I32 tensors to F16"):
        cast(np.zeros(3, np.uint32), BY_ST["I32"], BY_ST["F16"])
