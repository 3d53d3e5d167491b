"""quantize/recipes: one recipe per format behind one interface, and the table from quant_algo to
recipe. QuantSpec's format-dependent answers are its recipe's; these pin them to what the
formats meant before the recipes existed (the predicates' old definitions, written out here)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from common.errors import UserError
from quantize.algos import (ALL_ALGOS, FP8, MODELOPT_ALGOS, SMOOTHQUANT, SQ_PLUGIN, W4A16_AWQ,
                            WEIGHT_FLAGS, WEIGHT_ONLY_ALGOS)
from quantize.formats import QuantSpec
from quantize.recipes import MAX, MODELOPT, RECIPES, SQ_HOOKS, Recipe, find_recipe, recipe_for

SPECS = [QuantSpec.create(algo, kv_cache_dtype=kv)
         for algo in (None, *ALL_ALGOS) for kv in (None, "int8", "fp8")
         if not (algo == FP8 and kv == "int8") and not (algo in SQ_PLUGIN and kv == "fp8")]


def test_table_covers_every_format_in_order():
    assert tuple(RECIPES) == (None, *ALL_ALGOS)
    for algo, recipe in RECIPES.items():
        assert isinstance(recipe, Recipe) and recipe.quant_algo == algo
    assert {flag for _, _, flag in WEIGHT_FLAGS} == {r.flag for r in RECIPES.values() if r.flag}


def test_unknown_format_is_refused_naming_the_table():
    with pytest.raises(UserError, match=r"^unknown quant_algo 'NVFP4'; supported: None, W8A8_SQ_PER_CHANNEL, "):
        recipe_for("NVFP4")
    assert find_recipe("NVFP4") is None and find_recipe(["not", "hashable"]) is None


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_predicates_keep_their_meaning(spec):
    algo, kv = spec.quant_algo, spec.kv_cache_quant_algo
    plugin = algo in SQ_PLUGIN
    needs = algo in MODELOPT_ALGOS or plugin or kv is not None
    assert spec.is_quantized == (algo is not None or kv is not None)
    assert spec.is_weight_only == (algo in WEIGHT_ONLY_ALGOS)
    assert spec.is_sq_plugin == plugin
    assert spec.needs_calibration == needs
    assert spec.is_max_calibrated == (needs and not plugin and algo not in (SMOOTHQUANT, W4A16_AWQ))
    method = spec.format.calibration(spec)
    assert method == (SQ_HOOKS if plugin else MODELOPT if algo in (SMOOTHQUANT, W4A16_AWQ)
                      else MAX if needs else None)
    block = spec.to_trtllm_quantization()
    assert (block["quant_algo"], block["kv_cache_quant_algo"]) == (algo, kv)
    assert ("group_size" in block) == (algo == W4A16_AWQ or plugin)


def test_moe_support_per_format():
    shape = SimpleNamespace(experts=4, hidden=64, inter=96, layers=2)
    layout = SimpleNamespace(moe_tp=1)
    with pytest.raises(UserError, match="^--smoothquant is not supported for mixture-of-experts"):
        recipe_for(SMOOTHQUANT).moe.preflight(QuantSpec.create(SMOOTHQUANT), shape, layout)
    fp8 = QuantSpec.create(FP8)
    assert fp8.format.moe.exclude_modules(fp8, shape) == [
        "lm_head", "transformer.layers.0.mlp.router", "transformer.layers.1.mlp.router"]
    assert recipe_for(None).moe.experts is None and recipe_for(W4A16_AWQ).moe.experts == "awq"


def test_recipes_import_no_torch():
    code = "import sys, quantize.recipes, quantize.formats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
