"""One recipe per quantization format, and the table from ``quant_algo`` to recipe.

Every format-dependent answer of a build comes from its :class:`Recipe` (the interface, and the
float format's defaults, in base.py); :class:`quantize.formats.QuantSpec` delegates to
``RECIPES[spec.quant_algo]`` (``spec.format``). One folder per recipe family:

==================  ====================================================================
sq_plugin/          TensorRT-LLM's SmoothQuant plugin formats (4 variants)
modelopt/           modelopt-calibrated: W8A8_SQ_PER_CHANNEL, W4A16_AWQ
max/                max-calibrated: FP8 (and, in base.py, a KV cache alone)
weight_only/        W8A16, W4A16 (trtllm-build quantizes the float weights)
fp8_rowwise/        FP8_PER_CHANNEL_PER_TOKEN (quantized from the weights alone, no calibration)
nvfp4/              NVFP4 (max-calibrated like FP8; E2M1 blocks of 16, E4M3 block scales)
w4a8_awq/           W4A8_AWQ (modelopt-calibrated INT4 AWQ weights, FP8 activations)
moe/                what each format does for mixture-of-experts models (``Recipe.moe``)
==================  ====================================================================

docs/adding-a-recipe.md says how to add one.
"""
from __future__ import annotations

from common.errors import UserError

from ..algos import (FP8, FP8_ROWWISE, NVFP4, SMOOTHQUANT, SQ_PLUGIN_ALGOS, W4A16, W4A16_AWQ, W4A8_AWQ,
                     W8A16)
from .base import KV_CACHE_BITS, MAX, MODELOPT, SQ_HOOKS, Recipe, kv_cache_algo  # noqa: F401
from .parts import MemoryModel  # noqa: F401
from .fp8_rowwise import Fp8Rowwise
from .max import Fp8
from .modelopt import Awq, ModeloptSmoothQuant
from .nvfp4 import Nvfp4
from .sq_plugin import SqPlugin
from .w4a8_awq import W4A8Awq
from .weight_only import WeightOnly

#: quant_algo -> recipe; the key order is the order ``supported:`` lists them in
RECIPES: dict[str | None, Recipe] = {
    None: Recipe(),
    SMOOTHQUANT: ModeloptSmoothQuant(),
    **{algo: SqPlugin(algo, per_channel, per_token)
       for (per_channel, per_token), algo in SQ_PLUGIN_ALGOS.items()},
    FP8: Fp8(),
    W8A16: WeightOnly(W8A16, "--int8-weight-only", (64, 32)),
    W4A16: WeightOnly(W4A16, "--int4-weight-only", (64, 64)),
    W4A16_AWQ: Awq(),
    FP8_ROWWISE: Fp8Rowwise(),
    NVFP4: Nvfp4(),
    W4A8_AWQ: W4A8Awq(),
}


def find_recipe(quant_algo) -> Recipe | None:
    """The recipe of ``quant_algo`` (None: no recipe writes it)."""
    try:
        return RECIPES.get(quant_algo)
    except TypeError:  # an unhashable value from a hand-written config
        return None


def recipe_for(quant_algo) -> Recipe:
    """The recipe of ``quant_algo``; UserError naming the supported ones when there is none."""
    recipe = find_recipe(quant_algo)
    if recipe is None:
        raise UserError(f"unknown quant_algo {quant_algo!r}; supported: "
                        f"{', '.join(str(a) for a in RECIPES)}")
    return recipe
