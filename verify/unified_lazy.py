"""A unified (``--target pytorch``) checkpoint read one decoder layer at a time: the source of a
lazy :class:`verify.checkpoint.RankTensors`, so that the quality gate and ``--verify`` hold one
layer of it, whatever the depth, as they do for a TensorRT-LLM checkpoint.

The tensor names come from the files' headers, mapped once on meta tensors (shapes and dtypes, no
data) by the same :class:`verify.unified_reader.UnifiedMap` that ``load_unified`` uses; a read maps
the layers it is asked for from just those layers' tensors. Reads are ``pread``\\ s at the headers'
offsets (convert.source.SourceCheckpoint): no mapping of the file stays resident.
"""
from __future__ import annotations

import re

import torch

from quantize.torch_io import read_tensor

from .unified_reader import UnifiedMap

Tensor = torch.Tensor

_TRT_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


class UnifiedLayers:
    """``names`` (TensorRT-LLM names, tp 1) and ``read(prefixes) -> {prefix: {suffix: tensor}}``
    of a unified checkpoint: a module's whole decoder layer (or its global tensors) is read and
    mapped for it; the files are opened per read."""

    def __init__(self, unified: UnifiedMap):
        from convert.source import SourceCheckpoint

        self.map = unified
        self.source = SourceCheckpoint(unified.dir)  # validates the files with one-line errors
        self.source.close()  # reopened per read
        global_names, self._layers = unified.split(list(self.source.meta))
        self._globals = unified.global_sources(global_names)  # TRT-LLM name -> unified name
        self.names = list(self._globals)
        for i in sorted(self._layers):
            self.names += list(unified.layer(i, self._layer_tensors(i, self._meta)))

    def _meta(self, name: str) -> Tensor:
        return torch.empty(self.source.shape(name), dtype=self.source.dtype(name).torch, device="meta")

    def _layer_tensors(self, i: int, get) -> dict[str, dict[str, Tensor]]:
        return {mod: {k: get(n) for k, n in sfx.items()} for mod, sfx in self._layers[i].items()}

    def read(self, prefixes: list[str]) -> dict[str, dict[str, Tensor]]:
        by_layer: dict[int | None, list[str]] = {}
        for p in prefixes:
            m = _TRT_LAYER.match(p + ".")
            by_layer.setdefault(int(m.group(1)) if m else None, []).append(p)
        out: dict[str, dict[str, Tensor]] = {}
        try:
            for i, want in by_layer.items():
                if i is None:
                    tensors = {tn: self.map.global_tensor(un, read_tensor(self.source, un))
                               for tn, un in self._globals.items() if tn.rpartition(".")[0] in want}
                else:
                    tensors = self.map.layer(i, self._layer_tensors(i, lambda n: read_tensor(self.source, n)))
                for name, t in tensors.items():
                    prefix, _, suffix = name.rpartition(".")
                    if prefix in want:
                        out.setdefault(prefix, {})[suffix] = t
        finally:
            self.source.close()
        return out
