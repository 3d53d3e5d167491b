"""Reading a TensorRT-LLM checkpoint for the CPU reference reader: ``config.json``, its mapping,
and every rank's tensors by module, either all in memory or read from ``rank{r}.safetensors``
one module (or one decoder layer) at a time, so that the reader's peak memory is one layer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch

from common.errors import UserError

Tensor = torch.Tensor

LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")


def read_config(d: Path) -> dict:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing: {d} is not a TensorRT-LLM checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} must hold a JSON object")
    return config


def mapping(config: dict, where="config.json") -> tuple[int, int]:
    """(tp, pp) of a checkpoint config, checked against its world_size."""
    m = config.get("mapping") or {}
    try:
        tp = int(m.get("tp_size", 1))
        pp = int(m.get("pp_size", 1))
        world = int(m.get("world_size", tp * pp))
    except (TypeError, ValueError):
        raise UserError(f"{where}: mapping must hold integer tp_size/pp_size/world_size, got {m!r}") from None
    if tp < 1 or pp < 1 or world != tp * pp:
        raise UserError(f"{where}: mapping world_size {world} != tp_size {tp} x pp_size {pp}")
    return tp, pp


def _rank_paths(d: Path, config: dict) -> list[Path]:
    tp, pp = mapping(config, d / "config.json")
    paths = [d / f"rank{r}.safetensors" for r in range(tp * pp)]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p} is missing: mapping says world_size {tp * pp} (tp {tp} x pp {pp})")
    return paths


def _checked_dir(ckpt_dir) -> Path:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise UserError(f"checkpoint directory {d} does not exist (expected config.json + rank*.safetensors)")
    return d


def load_checkpoint(ckpt_dir) -> tuple[dict, list[dict[str, Tensor]]]:
    """Read ``config.json`` and every ``rank{r}.safetensors`` (r < mapping.world_size) into memory."""
    from safetensors.torch import load_file

    from .unified_reader import is_unified_checkpoint, load_unified  # modelopt unified HF checkpoint

    d = _checked_dir(ckpt_dir)
    if is_unified_checkpoint(d):
        from .unified_planned import is_planned, load_planned  # MLA: through the family's plan

        return load_planned(d) if is_planned(d) else load_unified(d)
    config = read_config(d)
    ranks = []
    for p in _rank_paths(d, config):
        try:
            ranks.append(load_file(p))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise UserError(f"cannot read {p}: {e}") from None
    return config, ranks


def open_checkpoint(ckpt_dir, lazy: bool = False) -> tuple[dict, list["RankTensors"]]:
    """``config`` and one :class:`RankTensors` per rank; ``lazy``: tensors stay on disk until a
    module is asked for (a unified checkpoint: its decoder layer, verify/unified_lazy.py)."""
    from .unified_reader import UnifiedMap, is_unified_checkpoint

    from .unified_planned import is_planned

    d = _checked_dir(ckpt_dir)
    if not lazy or is_unified_checkpoint(d) and is_planned(d):
        config, ranks = load_checkpoint(d)
        return config, [RankTensors(tensors=r) for r in ranks]
    if is_unified_checkpoint(d):
        from .unified_lazy import UnifiedLayers

        unified = UnifiedMap(d)
        return unified.config, [RankTensors(source=UnifiedLayers(unified))]
    config = read_config(d)
    return config, [RankTensors(path=p) for p in _rank_paths(d, config)]


def _by_module(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """{'transformer.layers.0.attention.qkv': {'weight': full name, 'bias': ...}, ...}"""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        prefix, _, suffix = name.rpartition(".")
        out.setdefault(prefix, {})[suffix] = name
    return out


class RankFile:
    """One ``rank{r}.safetensors``: ``names`` and ``read(prefixes) -> {prefix: {suffix: tensor}}``,
    the file opened per read, so no mapping of the whole file stays resident."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                self.names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read {path}: {e}") from None
        self._modules = _by_module(self.names)

    def read(self, prefixes: list[str]) -> dict[str, dict[str, Tensor]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {p: {s: f.get_tensor(n) for s, n in self._modules[p].items()} for p in prefixes}
        except Exception as e:
            raise UserError(f"cannot read {self.path}: {e}") from None


class RankTensors:
    """One rank's tensors by module: ``get(prefix) -> {suffix: tensor}``.

    In memory (``tensors``) or on disk: a rank file (``path``, :class:`RankFile`) or another
    ``source`` with ``names`` and ``read(prefixes)`` (a unified checkpoint's layers,
    verify/unified_lazy.py). On disk, ``get`` reads the module's tensors each time, except modules
    made resident with :meth:`hold` until :meth:`release` (a decoder layer while every window runs
    through it)."""

    def __init__(self, path: Path | None = None, tensors: dict[str, Tensor] | None = None,
                 source=None):
        self._mem = tensors
        self._source = None if tensors is not None else source or RankFile(path)
        self.names = list(tensors) if tensors is not None else self._source.names
        self._modules = _by_module(self.names)
        self._held: dict[str, dict[str, Tensor]] = {}

    def get(self, prefix: str, default=None):
        if prefix in self._held:
            return self._held[prefix]
        names = self._modules.get(prefix)
        if names is None:
            return default
        if self._mem is not None:
            return {s: self._mem[n] for s, n in names.items()}
        return self._source.read([prefix])[prefix]

    def hold(self, prefixes: Iterable[str]) -> None:
        """Keep these modules in memory until :meth:`release` (no-op for in-memory tensors)."""
        if self._mem is None:
            want = [p for p in prefixes if p in self._modules and p not in self._held]
            self._held.update(self._source.read(want))

    def has(self, prefix: str) -> bool:
        return prefix in self._modules

    @property
    def tensors(self) -> dict[str, Tensor] | None:
        """The tensors by full name when held in memory (None for a rank read from disk)."""
        return self._mem

    def layer_modules(self, i: int) -> list[str]:
        head = f"transformer.layers.{i}."
        return [p for p in self._modules if (p + ".").startswith(head)]

    def release(self) -> None:
        self._held.clear()


def pp_layers(num_layers: int, pp_size: int, pp_rank: int, partition=None) -> list[int]:
    """Global layer indices of pipeline stage ``pp_rank`` (TensorRT-LLM's Mapping.pp_layers)."""
    if partition:
        start = sum(partition[:pp_rank])
        return list(range(start, start + partition[pp_rank]))
    return torch.tensor_split(torch.arange(num_layers), pp_size)[pp_rank].tolist()
