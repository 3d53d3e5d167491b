"""A model directory's config.json: parsed once, normalised as transformers' AutoConfig does."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from common.errors import UserError

from .config_json import normalised_config
from .families import ARCHITECTURES, REFUSED_ARCHITECTURES

# HF architecture -> family name (model.families)
SUPPORTED_ARCHITECTURES = ARCHITECTURES


#: config.json parsed, per (real path, mtime, size): every reader of one run shares one parse
_PARSED: dict = {}


def config_dict(model_dir) -> dict:
    """``model_dir/config.json`` parsed (read once per process while the file is unchanged);
    raises OSError / ValueError as reading and json.loads would. Callers must not mutate it."""
    path = os.path.realpath(Path(model_dir) / "config.json")
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _PARSED:
        with open(path, encoding="utf-8") as f:
            _PARSED[key] = json.loads(f.read())
    return _PARSED[key]


def pretrained_config(model_dir, **kwargs):
    """transformers' config object of ``model_dir`` built from the shared parse (the class
    AutoConfig would pick, ``from_dict`` as AutoConfig.from_pretrained calls it); AutoConfig
    itself for a model_type transformers maps elsewhere or not at all."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = config_dict(model_dir)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in CONFIG_MAPPING or "auto_map" in raw:
        return AutoConfig.from_pretrained(model_dir, **kwargs)
    return CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(raw), name_or_path=str(model_dir),
                                                **kwargs)


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
        raw = config_dict(model_dir)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{model_dir / 'config.json'} is not valid JSON ({e}); re-download the model")
    _check_fields(raw, model_dir / "config.json")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise UserError(f"{model_dir / 'config.json'}: architectures is {json.dumps(archs)}, not "
                        f"a list such as [\"LlamaForCausalLM\"]; fix config.json")
    arch = archs[0] if archs else None
    if arch in REFUSED_ARCHITECTURES:
        raise UserError(f"{model_dir / 'config.json'}: {REFUSED_ARCHITECTURES[arch]}")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"architecture {arch!r} in {model_dir / 'config.json'} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    fast = normalised_config(raw)
    return raw, fast if fast is not None else load_auto_config(model_dir)


#: the sizes a model is laid out by: a count of zero or less cannot be one (types are left to
#: transformers' own validation, whose message names the field)
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
             "num_experts", "num_experts_per_tok")


def _check_fields(raw, path: Path) -> None:
    """config.json must be a JSON object whose layer and head counts are positive."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {type(raw).__name__}, not an object of model "
                        f"settings; re-download the model")
    for key in _POSITIVE:
        v = raw.get(key)
        if isinstance(v, int) and v <= 0:
            raise UserError(f"{path}: {key} is {json.dumps(v)}; it must be a positive integer: "
                            f"fix config.json or re-download the model")


def load_auto_config(model_dir: Path):
    """transformers' AutoConfig of ``model_dir`` (its result and its error, in one line)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad config
        raise UserError(f"cannot read {model_dir / 'config.json'} with transformers: "
                        f"{str(e).strip() or type(e).__name__}; "
                        f"fix config.json or re-download the model") from None


def read_hf_config(model_dir, *, auto_config: bool = False):
    """The normalised config alone (``auto_config``: always through AutoConfig, for tests)."""
    _, hf = read_config(model_dir)
    if auto_config and not hasattr(hf, "to_dict"):  # the fast path was taken: AutoConfig's own
        return load_auto_config(Path(model_dir))
    return hf
