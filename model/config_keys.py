"""The fixed TensorRT-LLM ``config.json`` keys a family's converter adds (``Family.trtllm_config``
of fixed keys: Qwen's ``qwen_type``): values, or reads of the HF config."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FromHF:
    """A TensorRT-LLM config.json value read from the HF config: ``getattr(hf, attr, default)``."""

    attr: str
    default: object = None


@dataclass(frozen=True)
class ConfigKeys:
    """A ``Family.trtllm_config`` hook of fixed keys (Qwen: ``qwen_type``): each a value or a
    ``FromHF``, written in this order."""

    keys: tuple[tuple[str, object], ...]

    def __call__(self, hf, shape, tp: int) -> dict:
        return {k: getattr(hf, v.attr, v.default) if isinstance(v, FromHF) else v
                for k, v in self.keys}
