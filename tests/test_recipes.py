"""quantize/recipes: one recipe per format behind one interface, and the table from quant_algo to
recipe. QuantSpec's format-dependent answers are its recipe's; these pin them to what the
formats meant before the recipes existed (the predicates' old definitions, written out here)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from model.families import FAMILIES

from common.errors import UserError
from quantize.algos import (ALL_ALGOS, FP8, FP8_ROWWISE, MODELOPT_ALGOS, NVFP4, SMOOTHQUANT, SQ_PLUGIN,
                            W4A16_AWQ, W4A8_AWQ, WEIGHT_FLAGS, WEIGHT_ONLY_ALGOS)
from quantize.formats import QuantSpec
from quantize.recipes import MAX, MODELOPT, RECIPES, SQ_HOOKS, Recipe, find_recipe, recipe_for

SPECS = [QuantSpec.create(algo, kv_cache_dtype=kv)
         for algo in (None, *ALL_ALGOS) for kv in (None, "int8", "fp8")
         if not (algo in (FP8, NVFP4) and kv == "int8") and not (algo in SQ_PLUGIN and kv == "fp8")
         and not (algo == FP8_ROWWISE and kv is not None)]


def test_table_covers_every_format_in_order():
    assert tuple(RECIPES) == (None, *ALL_ALGOS)
    for algo, recipe in RECIPES.items():
        assert isinstance(recipe, Recipe) and recipe.quant_algo == algo
    assert {flag for _, _, flag in WEIGHT_FLAGS} == {r.flag for r in RECIPES.values() if r.flag}


def test_unknown_format_is_refused_naming_the_table():
    with pytest.raises(UserError, match=r"^unknown quant_algo 'MXFP4'; supported: None, W8A8_SQ_PER_CHANNEL, "):
        recipe_for("MXFP4")
    assert find_recipe("MXFP4") is None and find_recipe(["not", "hashable"]) is None


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_predicates_keep_their_meaning(spec):
    algo, kv = spec.quant_algo, spec.kv_cache_quant_algo
    plugin = algo in SQ_PLUGIN
    needs = algo in MODELOPT_ALGOS or plugin or kv is not None
    assert spec.is_quantized == (algo is not None or kv is not None)
    assert spec.is_weight_only == (algo in WEIGHT_ONLY_ALGOS)
    assert spec.is_sq_plugin == plugin
    assert spec.needs_calibration == needs
    modelopt = (SMOOTHQUANT, W4A16_AWQ, W4A8_AWQ)
    assert spec.is_max_calibrated == (needs and not plugin and algo not in modelopt)
    method = spec.format.calibration(spec)
    assert method == (SQ_HOOKS if plugin else MODELOPT if algo in modelopt
                      else MAX if needs else None)
    block = spec.to_trtllm_quantization()
    assert (block["quant_algo"], block["kv_cache_quant_algo"]) == (algo, kv)
    assert ("group_size" in block) == (algo in (W4A16_AWQ, W4A8_AWQ, FP8_ROWWISE, NVFP4) or plugin)


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


def test_linear_shape_checks_per_format():
    """The members quantize/apply.py's preflight will call (issue 23's follow-up)."""
    w8 = QuantSpec.create("W8A16")
    w8.format.check_linear_shapes(w8, {"mlp.proj": 128}, {"mlp.proj": 96})
    with pytest.raises(UserError, match=r"^W8A16: mlp.proj has 80 output features per rank, not a multiple "
                                        r"of 32 as TensorRT-LLM's weight-only kernels need; choose another"):
        w8.format.check_linear_shapes(w8, {"mlp.proj": 128}, {"mlp.proj": 80})
    awq = QuantSpec.create(W4A16_AWQ, awq_block_size=64)
    with pytest.raises(UserError, match=r"^--awq: attention.dense \(unpadded\) input size per rank 96 is not"):
        awq.format.check_linear_shapes(awq, {"attention.dense": 128}, {}, {"attention.dense (unpadded)": 96})
    fp8 = QuantSpec.create(FP8)
    fp8.format.check_linear_shapes(fp8, {"mlp.proj": 3}, {"mlp.proj": 5})  # no GEMM constraint
    assert [r.kv_duplication for r in (recipe_for(SMOOTHQUANT), recipe_for(SQ_PLUGIN[0]), recipe_for(FP8))] \
        == [False, False, True]
    assert recipe_for(W4A16_AWQ).vocab_padding == 63 and recipe_for(None).vocab_padding == 0
    assert fp8.format.calibration_fingerprint(fp8) is None
    kv = QuantSpec.create(None, kv_cache_dtype="int8")
    assert kv.format.calibration_fingerprint(kv) is None
    plugin = QuantSpec.create(SQ_PLUGIN[0])
    assert plugin.format.calibration_fingerprint(plugin) == "None"


@pytest.mark.parametrize("algo,block", [("W8A16", None), ("W4A16", None), (W4A16_AWQ, 64), (W4A16_AWQ, 128),
                                        (FP8, None), (SMOOTHQUANT, None)])
@pytest.mark.parametrize("hidden,heads,kv,inter,tp,padded", [
    (256, 8, 8, 512, 1, False), (256, 8, 2, 688, 2, False), (192, 6, 2, 512, 4, True),
    (320, 10, 10, 800, 2, False), (256, 8, 8, 544, 2, True)])
def test_recipe_shape_checks_equal_apply_preflight(algo, block, hidden, heads, kv, inter, tp, padded):
    """The recipe members give quantize/apply.py's preflight_quant its answers, message for
    message: the feature padding from ``feature_multiple`` (TensorRT-LLM's weight-only / AWQ
    linears), then ``check_linear_shapes`` on the padded shape and ``check_tp``."""
    from dataclasses import replace

    from model.shape import HeadPadding, Shape
    from quantize.apply import per_rank_in_dims, per_rank_out_dims, preflight_quant

    spec = QuantSpec.create(algo, awq_block_size=block)
    hs = hidden // heads
    shape = Shape(family="llama", layers=1, heads=heads, kv_heads=kv, head_size=hs, hidden=hidden,
                  inter=inter, vocab=1000, tied=False, attn_bias=False, dense_bias=False,
                  mlp_bias=False, padding=HeadPadding(heads, kv, heads + tp, kv) if padded else None)

    def outcome(fn):
        try:
            fn()
        except UserError as e:
            return str(e).split(";")[0]  # the valid --tp values are the plan's (pipeline.checkpoint)

    def via_recipe():
        m = spec.format.feature_multiple(spec)
        s = shape
        if m is not None:
            for lin in FAMILIES["llama"].dense_linears():
                out_r, in_r = lin.rank_features(shape, tp)
                full = {"output": out_r * tp if lin.column_parallel else out_r,
                        "input": in_r if lin.column_parallel else in_r * tp}
                for what, n in full.items():
                    dim = lin.shapes[0][0] if what == "output" else lin.shapes[0][1]
                    if n % (m * tp) and dim not in ("inter", "hidden"):  # padded exactly
                        raise UserError(f"{spec.quant_algo}: TensorRT-LLM's {spec.format.padding_layer} "
                                        f"pads a linear's input and output features to a multiple of "
                                        f"{m} x tp = {m * tp} and no activation (tensorrt_llm/"
                                        f"quantization/layers.py): {lin.name}'s {n} {what} features "
                                        f"would not meet the model's")
            if inter % (m * tp):
                s = replace(s, padded_inter=-(-inter // (m * tp)) * m * tp)
            if hidden % (m * tp):
                s = replace(s, padded_hidden=-(-hidden // (m * tp)) * m * tp)
        # the calibration pads what is not whole groups of AWQ's block (quantize.calib_padding)
        block = spec.group_size if algo == "W4A16_AWQ" else 1
        calib_heads = padded and (heads * hs) % block
        unpadded = {"attention.dense (unpadded)": heads * hs} if padded and not calib_heads else {}
        if s.padded_inter:
            unpadded["mlp.proj (unpadded)"] = inter
        if s.padded_hidden:
            unpadded["attention.qkv (calibrated hidden)"] = -(-hidden // block) * block
        spec.format.check_linear_shapes(spec, per_rank_in_dims(s, tp), per_rank_out_dims(s, tp), unpadded)
        spec.format.check_tp(spec, s.tp_kv_heads, tp)

    assert outcome(via_recipe) == outcome(lambda: preflight_quant(spec, shape, tp, 1))
