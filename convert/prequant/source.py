"""The source checkpoint of a pre-quantized model as the float plan sees it: every packed linear
``P`` (``P.qweight`` / ``P.weight_packed`` and their scales and zero points) appears as a virtual
``P.weight`` of its unpacked shape ``[out, in]``, so ``convert.plan.rank_plan`` splits and fuses it
with the float rules (column / row split, q/k/v fused). No virtual weight is ever read: the
recipe (quantize/recipes/prequantized) replaces each planned one by TensorRT-LLM's int4 tensors of
the same pieces (``int4.slice_tensors``) before anything is written."""
from __future__ import annotations

from convert.source import SourceCheckpoint
from convert.source_files import check_float_model

#: the tensors a packer writes per linear, by the tensor that marks a packed linear
PACKED = {"qweight": ("qweight", "qzeros", "scales", "g_idx"),
          "weight_packed": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                            "weight_g_idx")}


class PrequantSource(SourceCheckpoint):
    """A :class:`SourceCheckpoint` with each packed linear's virtual ``weight``; ``quant`` the
    directory's :class:`convert.prequant.scheme.SourceQuant`."""

    def __init__(self, model_dir, quant, declared_dtype: str | None = None):
        super().__init__(model_dir, None)
        self.quant = quant
        self.virtual: dict[str, tuple[int, ...]] = {}
        parts = set()
        for name in list(self.meta):
            prefix, _, leaf = name.rpartition(".")
            if leaf in PACKED:
                self.virtual[f"{prefix}.weight"] = self._unpacked_shape(name, leaf)
                parts.update(f"{prefix}.{p}" for p in PACKED[leaf])
        check_float_model({n: m for n, m in self.meta.items() if n not in parts}, declared_dtype)
        self._scale_name = "scales" if quant.method in ("gptq", "awq") else "weight_scale"

    def _unpacked_shape(self, name: str, leaf: str) -> tuple[int, int]:
        a, b = self.meta[name][1]
        if leaf == "weight_packed":          # [out, in/8]
            return (a, b * 8)
        if self.quant.method == "gptq":      # [in/8, out]
            return (b, a * 8)
        return (b * 8, a)                     # awq: [in, out/8]

    def is_virtual(self, name: str) -> bool:
        """Whether ``name`` is a quantized linear's weight (packed int4: virtual; fp8: the
        stored e4m3 weight beside its ``weight_scale``)."""
        if self.quant.fp8:
            return name.endswith(".weight") and name[:-len("weight")] + "weight_scale" in self.meta
        return name in self.virtual

    def __contains__(self, name: str) -> bool:
        return name in self.virtual or name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.virtual[name] if name in self.virtual else self.meta[name][1]

    def dtype(self, name: str):
        if name in self.virtual:  # the dtype of its scales (the linear's float dtype)
            return self.meta[name[:-len("weight")] + self._scale_name][2]
        return self.meta[name][2]

    def read_bits(self, name: str, index: tuple = ()):
        if name in self.virtual:
            raise AssertionError(f"{name} is a packed linear's virtual weight: planned, never read")
        return super().read_bits(name, index)
