"""Block-scaled FP8 sources (DeepSeek-V3 / R1 as released): read as the float model they encode.

The format (config.json ``quantization_config`` ``{"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], "activation_scheme": "dynamic"}``; transformers'
``FineGrainedFP8`` / DeepSeek's ``inference/fp8_cast_bf16.py``): each quantized linear ``P`` holds
``P.weight`` float8_e4m3fn ``[out, in]`` and ``P.weight_scale_inv`` float32
``[ceil(out / bo), ceil(in / bi)]``; the float weight is ``w[r, c] = q[r, c] * s[r // bo, c // bi]``
(the last blocks partial). Every other tensor (embedding, norms, router, head) is stored in the
model dtype.

:class:`BlockFp8Source` is a :class:`convert.source.SourceCheckpoint` in which each such ``P.weight``
is that float weight in the model dtype (config.json's ``torch_dtype``; bfloat16 when absent) and
``P.weight_scale_inv`` is gone: every reader of a float source (the engine target's plan, the
unified writer, calibration) reads it unchanged. Only the rows asked for are read and dequantized
(float32 ``q * s``, rounded once to the model dtype, as ``fp8_cast_bf16.py``'s
``weight_dequant`` then ``.to(bfloat16)``), so the peak memory is one slice's, never the model's.
numpy only.
"""
from __future__ import annotations

import numpy as np

from common.dtypes import BY_NAME
from common.errors import UserError
from common.fileio import pread_exact

from . import source_files
from .casts import UINT, float32_into, to_float32
from .source import SourceCheckpoint

E4M3 = BY_NAME["float8_e4m3fn"]
F32 = BY_NAME["float32"]
SCALE = "weight_scale_inv"


def block_size(raw: dict) -> tuple[int, int] | None:
    """config.json ``raw``'s FP8 block size (rows, columns); None: not a block-scaled fp8 model.
    A malformed block size is refused in one line."""
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8" or \
            not qc.get("weight_block_size"):
        return None
    b = qc["weight_block_size"]
    if not (isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b)):
        raise UserError(f"the model's quantization_config has weight_block_size {b!r}; a "
                        f"block-scaled fp8 model has two positive integers ([128, 128])")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"the model's quantization_config has fp8 fmt {qc.get('fmt')!r}; only "
                        f"e4m3 block-scaled weights (DeepSeek-V3's release format) are read")
    return b[0], b[1]


class BlockFp8Source(SourceCheckpoint):
    """A block-scaled fp8 model directory seen as its float model (module docstring)."""

    def __init__(self, model_dir, block: tuple[int, int], declared_dtype: str | None = None):
        super().__init__(model_dir, None)
        self.block = block
        self.model_dtype = BY_NAME[declared_dtype or "bfloat16"]
        self.stored_meta = dict(self.meta)  # the file's own tensors (fp8 codes, scales)
        self.virtual: dict[str, str] = {}   # dequantized weight -> its scale tensor
        for name, (path, shape, dtype) in self.stored_meta.items():
            if not name.endswith("." + SCALE):
                continue
            weight = name[:-len(SCALE)] + "weight"
            w = self.stored_meta.get(weight)
            if w is None or w[2] != E4M3 or len(w[1]) != 2:
                raise UserError(f"{name} in {path} has no float8_e4m3fn 2-D {weight} beside it: "
                                f"not a block-scaled fp8 checkpoint; re-download the model")
            want = tuple(-(-n // b) for n, b in zip(w[1], block))
            if tuple(shape) != want or dtype != F32:
                raise UserError(f"{name} in {path} is {dtype.st} {list(shape)}; weight "
                                f"{list(w[1])} in blocks of {list(block)} has float32 "
                                f"{list(want)} scales; re-download the model")
            self.virtual[weight] = name
            self.meta[weight] = (w[0], tuple(w[1]), self.model_dtype)
            del self.meta[name]
        for name, (path, _, dtype) in self.meta.items():
            if dtype == E4M3 and name not in self.virtual:
                raise UserError(f"{name} in {path} is float8_e4m3fn without a {SCALE} beside "
                                f"it; re-download the model")
        source_files.check_float_model(self.meta, declared_dtype)

    def scan(self, background: bool = True):
        """The files' one read (digests, non-finite values) over the bytes as stored."""
        if self._scan is None:
            from common.source_scan import SourceScan

            self._scan = SourceScan(
                source_files.scan_table(self.files, self.stored_meta, self._offsets),
                background=background)
        return self._scan

    def stored(self, name: str) -> bool:
        return name not in self.virtual

    def span(self, name: str) -> tuple[int, int]:
        if name in self.virtual:
            raise AssertionError(f"{name} is dequantized when read: it has no span in a file")
        return super().span(name)

    def read_rows_bytes(self, name: str, start: int, buf: memoryview) -> None:
        if name not in self.virtual:
            return super().read_rows_bytes(name, start, buf)
        path, (rows, cols), dtype = self.meta[name]
        row = cols * dtype.itemsize
        n = len(buf) // row if row else 0
        if start < 0 or len(buf) % max(row, 1) or start + n > rows:
            raise ValueError(f"read_rows_bytes({name}): bad buffer of {len(buf)} bytes at {start}")
        if not n:
            return
        codes = np.empty((n, cols), np.uint8)
        pread_exact(self._fd(path), memoryview(codes.reshape(-1)),
                    self._offsets[name] + start * cols, path)
        bo, bi = self.block
        b0, b1 = start // bo, (start + n - 1) // bo + 1
        scales = to_float32(self._stored_rows(self.virtual[name], b0, b1), F32)
        s = np.repeat(np.repeat(scales, bo, axis=0)[start - b0 * bo:start - b0 * bo + n],
                      bi, axis=1)[:, :cols]
        x = to_float32(codes, E4M3) * s
        if not np.isfinite(x).all():  # e4m3's NaN codes, or a non-finite scale
            raise UserError(f"{name} has {int((~np.isfinite(x)).sum())} non-finite values in rows "
                            f"{start}..{start + n - 1} once dequantized (NaN fp8 codes or "
                            f"scales); the file is corrupt: re-download the model")
        out = np.frombuffer(buf, dtype=UINT[dtype.itemsize]).reshape(n, cols)
        float32_into(x, dtype, out)

    def _stored_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of stored 2-D tensor ``name`` as raw bits."""
        path, shape, dtype = self.stored_meta[name]
        out = np.empty((r1 - r0, *shape[1:]), UINT[dtype.itemsize])
        row = dtype.itemsize * int(np.prod(shape[1:]))
        pread_exact(self._fd(path), memoryview(out.reshape(-1)).cast("B"),
                    self._offsets[name] + r0 * row, path)
        return out


def open_source(model_dir, raw: dict, declared: str | None = None) -> SourceCheckpoint:
    """The source checkpoint of ``model_dir`` (config.json ``raw``) as a float model: a
    block-scaled fp8 one dequantized when read (:class:`BlockFp8Source`)."""
    block = block_size(raw)
    if block is None:
        return SourceCheckpoint(model_dir, declared_dtype=declared)
    return BlockFp8Source(model_dir, block, declared)
