"""The unified checkpoint's JSON (``hf_quant_config.json``, config.json's ``quantization_config``)
and which formats have a unified form — each answer from the format's recipe
(``Recipe.unified``, ``unified_refusal``, ``unified_quantization``)."""
from __future__ import annotations

from common.errors import UserError
from common.versions import dist_version

from ..algos import FP8, SMOOTHQUANT, W4A16_AWQ, W8A16  # noqa: F401 (LISTED)

#: modelopt version whose unified format this reproduces (written as the producer when modelopt
#: itself is not importable; otherwise the installed version, as export_hf_checkpoint writes).
MODELOPT_FORMAT_VERSION = "0.47.0"
#: the formats with a unified form, in the order a refusal lists them
LISTED = (SMOOTHQUANT, FP8, W4A16_AWQ, W8A16)


def check_supported(spec) -> None:
    """UserError (one line) when ``spec`` has no unified-checkpoint form, before any work."""
    recipe = spec.format
    why = recipe.unified_refusal(spec)
    if why is not None:
        raise UserError(f"--target pytorch: {why}")
    if recipe.unified is None:
        raise UserError(f"--target pytorch does not support {spec.name}; supported: "
                        f"{', '.join(LISTED)} or none")


def _producer() -> dict:
    # not installed: the format version we reproduce
    return {"name": "modelopt",
            "version": dist_version("nvidia-modelopt") or MODELOPT_FORMAT_VERSION}


def hf_quant_config(spec, family=None, num_layers: int = 0) -> dict | None:
    """``hf_quant_config.json`` as modelopt 0.47 writes it (None: unquantized, no file) for a
    model of ``family`` (model.spec.Family; None: Llama-like) with ``num_layers`` decoder layers
    (a mixture of experts lists each layer's router: quantize/unified/experts.py)."""
    from .experts import unquantized_modules

    q = spec.format.unified_quantization(spec)
    if q is None:
        return None
    if family is not None and not family.modelopt_embedding and "exclude_modules" in q:
        q["exclude_modules"] = [m for m in q["exclude_modules"] if m != "model.embed_tokens"]
    if family is not None and family.moe is not None and "exclude_modules" in q:
        q["exclude_modules"] = sorted(q["exclude_modules"]
                                      + unquantized_modules(family, num_layers))
    return {"producer": _producer(), "quantization": q}


def quantization_config(spec, hf_quant: dict) -> dict:
    """config.json's ``quantization_config`` (modelopt's convert_hf_quant_config_format)."""
    return spec.format.unified_quantization_config(spec, hf_quant)
