"""A model directory's config.json: parsed once, normalised as transformers' AutoConfig does."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError

from .config_json import normalised_config

# HF architecture -> family (convert.families, model.shape)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}


def read_config(model_dir) -> tuple[dict, object]:
    """(config.json as parsed, the config as AutoConfig normalises it): one read of the file,
    without transformers where ``model.config_json`` reproduces AutoConfig exactly, else with
    AutoConfig; one clear line on any problem."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist: pass a local Hugging Face "
                        f"model directory (config.json + *.safetensors) or a bundled example name")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{model_dir / 'config.json'} is not valid JSON ({e}); re-download the model")
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"architecture {arch!r} in {model_dir / 'config.json'} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    fast = normalised_config(raw)
    return raw, fast if fast is not None else load_auto_config(model_dir)


def load_auto_config(model_dir: Path):
    """transformers' AutoConfig of ``model_dir`` (its result and its error, in one line)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad config
        raise UserError(f"cannot read {model_dir / 'config.json'} with transformers: {e}")


def read_hf_config(model_dir, *, auto_config: bool = False):
    """The normalised config alone (``auto_config``: always through AutoConfig, for tests)."""
    _, hf = read_config(model_dir)
    if auto_config and not hasattr(hf, "to_dict"):  # the fast path was taken: AutoConfig's own
        return load_auto_config(Path(model_dir))
    return hf
