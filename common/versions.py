"""Installed versions of the software that shapes the outputs, read from package metadata
(nothing is imported): the one place the project asks which version of a distribution is
installed."""
from __future__ import annotations

import importlib.metadata
import platform

# name in build.json → distribution names to look up (first found wins)
_VERSIONED = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "safetensors": ("safetensors",),
    "modelopt": ("nvidia-modelopt", "nvidia_modelopt"),
    "tensorrt_llm": ("tensorrt_llm", "tensorrt-llm"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt_cu12"),
}


def dist_version(*names: str) -> str | None:
    """The installed version of the first of ``names`` (distribution spellings) found, or None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def major_version(*names: str) -> int | None:
    """The major version of the first of ``names`` installed, or None (absent or unparsable)."""
    v = dist_version(*names)
    try:
        return int(v.split(".")[0]) if v is not None else None
    except ValueError:
        return None


def software_versions() -> dict:
    """python and the libraries that shape the outputs; None for what is not installed."""
    out = {"python": platform.python_version()}
    for key, names in _VERSIONED.items():
        out[key] = dist_version(*names)
    out["trtllm_engine_builder"] = dist_version("trtllm-engine-builder")
    return out
