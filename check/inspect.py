"""What a directory is, and a TensorRT-LLM checkpoint's config and rank headers (headers only).

Kinds, by the files TensorRT-LLM's and the other tools' loaders key on:

- a TensorRT-LLM checkpoint: ``config.json`` with ``architecture`` (singular; what
  ``PretrainedConfig.from_dict`` reads) and ``rank{r}.safetensors``;
- an engine directory: ``config.json`` with ``pretrained_config`` and ``build_config``
  (``tensorrt_llm/builder.py`` ``Engine.save``) and ``rank{r}.engine``;
- a modelopt unified checkpoint: ``hf_quant_config.json`` beside a Hugging Face ``config.json``
  (modelopt's ``export_hf_checkpoint``), loaded by TensorRT-LLM's PyTorch backend, not by
  ``trtllm-build``;
- a Hugging Face model directory: ``config.json`` with ``architectures`` (plural) or
  ``model_type``; ``trtllm-build`` fails on it with ``KeyError: 'architecture'``
  (NVIDIA/TensorRT-LLM#6360).
"""
from __future__ import annotations

import json
from pathlib import Path

from common.dtypes import BY_ST
from common.errors import UserError
from common.safetensors_header import read_header

TRTLLM, ENGINES, UNIFIED, HF, OUTPUT, OTHER = ("trtllm_checkpoint", "engine_dir", "modelopt_unified",
                                              "hf_model", "build_engine_output", "other")


def read_config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): not a checkpoint")
    if not isinstance(config, dict):
        raise UserError(f"{path} holds {type(config).__name__}, not a JSON object: not a checkpoint")
    return config


def kind_of(d: Path) -> tuple[str, dict | None]:
    """(the kind of directory ``d``, its config.json or None)."""
    if not d.is_dir():
        raise UserError(f"{d} is not a directory")
    config = read_config(d / "config.json")
    if config is None:
        return (OUTPUT if (d / "checkpoint" / "config.json").is_file() else OTHER), None
    if "pretrained_config" in config and "build_config" in config:
        return ENGINES, config
    if (d / "hf_quant_config.json").is_file():
        return UNIFIED, config
    if "architecture" in config or any(d.glob("rank*.safetensors")):
        return TRTLLM, config
    if "architectures" in config or "model_type" in config:
        return HF, config
    return OTHER, config


def what_it_is(kind: str, d: Path) -> str:
    """One line saying what ``d`` is and what trtllm-build needs instead (not a checkpoint)."""
    return {
        HF: f"{d} is a Hugging Face model directory; trtllm-build needs a TensorRT-LLM checkpoint "
            f"(it would fail with KeyError: 'architecture'): run build_engine --model {d} --output "
            f"OUT ... and check OUT/checkpoint",
        UNIFIED: f"{d} is a modelopt unified (Hugging Face) checkpoint, loaded by TensorRT-LLM's "
                 f"PyTorch backend (trtllm-serve {d}), not by trtllm-build; for engines convert "
                 f"the source model with build_engine --model HF_DIR --target engine",
        ENGINES: f"{d} is an engine directory (built engines), not a checkpoint: check the "
                 f"checkpoint it was built from",
        OUTPUT: f"{d} is build_engine's output directory: check its checkpoint, {d / 'checkpoint'}",
        OTHER: f"{d} is not a TensorRT-LLM checkpoint (no config.json with an \"architecture\" "
               f"and rank*.safetensors); give the checkpoint directory build_engine wrote "
               f"(OUT/checkpoint)",
    }[kind]


def rank_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, torch dtype name) of a rank file, from its header alone."""
    header, _ = read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = BY_ST.get(info.get("dtype"))
        out[name] = (tuple(info["shape"]), dt.torch_name if dt else str(info.get("dtype")))
    return out
