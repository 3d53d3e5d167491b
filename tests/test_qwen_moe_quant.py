"""Quantized Qwen2-MoE / Qwen3-MoE (engine target): our checkpoint equals nvidia-modelopt 0.47's
``export_tensorrt_llm_checkpoint(decoder_type="qwen")`` of an independent calibration
(transformers 4.57.1 in a subprocess, tests/hf4_export.py) bit for bit at tp 1, tp 2 (moe_tp 2),
tp 2 (moe_ep 2) and tp 4 (2 x 2), config.json's quantization block included, for the formats
the families list (model/families/qwen_moe.py ``FORMATS``): FP8 (+ FP8 KV), INT8 / INT4
weight-only (float experts + quant_algo; + INT8 KV), a KV cache alone, INT4-AWQ (group 128 + INT8
KV at tp 1/2, group 64 (+ FP8 KV) at every layout; the experts calibrated on transformers 4's
per-expert block built from the family spec, quantize/moe_blocks.py). Qwen2-MoE's shared expert
is a dense linear of the family (fc = [up; gate], one FP8 scale for both, as modelopt's
``preprocess_linear_fusion``), its ``shared_expert_gate`` listed in ``exclude_modules`` as
modelopt does. The reader runs the FP8 and AWQ checkpoints within the formats' bounds of HF.
SmoothQuant and NVFP4 are refused (the family's formats say why)."""
from __future__ import annotations


import pytest
import torch

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from test_moe import LAYOUTS, needs_hf4, run_cli
from test_moe_quant import CALIB, _fresh, ranks_equal_modelopt
from test_qwen3 import trtllm_semantics

#: weight-only- and FP8-friendly shapes: experts 256 wide, the shared expert 512, Qwen3-MoE's
#: attention 8 x 32 wide (weight-only pads every dense feature to 64 x tp: 256 at tp 4)
SHAPES = dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256)


@pytest.fixture(scope="module")
def qmodels(tmp_path_factory):
    from examples.tiny import make_tiny_model

    out = {}
    for fam, extra in (("qwen2_moe", {"shared_expert_intermediate_size": 512}),
                       ("qwen3_moe", {"head_dim": 32})):
        d = tmp_path_factory.mktemp("hf_" + fam)
        out[fam] = d, make_tiny_model(d, family=fam, **SHAPES, **extra).float().eval()
    return out


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, calib_text):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calib_text, encoding="utf-8")
    return p


# (family, our quant_algo, kv, AWQ group, modelopt's quant / kv: weight-only = a float export,
# layouts). AWQ 128 stops at tp 2: at tp 4 attention.dense has 64 inputs per rank, fewer than a
# group (refused by our preflight, and modelopt's export fails on it)
CASES = [("qwen2_moe", "FP8", None, None, "FP8", None, LAYOUTS),
         ("qwen3_moe", "FP8", "fp8", None, "FP8", "fp8", LAYOUTS),
         ("qwen2_moe", "W8A16", "int8", None, None, "int8", LAYOUTS),
         ("qwen3_moe", "W4A16", None, None, None, None, LAYOUTS),
         ("qwen2_moe", None, "fp8", None, None, "fp8", LAYOUTS),
         ("qwen2_moe", "W4A16_AWQ", "int8", 128, "W4A16_AWQ", "int8", LAYOUTS[:3]),
         ("qwen2_moe", "W4A16_AWQ", None, 64, "W4A16_AWQ", None, LAYOUTS),
         ("qwen3_moe", "W4A16_AWQ", "fp8", 64, "W4A16_AWQ", "fp8", LAYOUTS),
         ("qwen3_moe", "W4A16_AWQ", None, 128, "W4A16_AWQ", None, LAYOUTS[:3])]


@pytest.mark.slow
@needs_hf4
@pytest.mark.parametrize("family,algo,kv,group,mo_algo,mo_kv,layouts", CASES,
                         ids=["q2_fp8", "q3_fp8_kv_fp8", "q2_w8a16_kv_int8", "q3_w4a16",
                              "q2_kv_fp8", "q2_awq128_kv_int8", "q2_awq64", "q3_awq64_kv_fp8",
                              "q3_awq128"])
def test_quantized_equals_modelopt_export(tmp_path, qmodels, calib_file, family, algo, kv, group,
                                          mo_algo, mo_kv, layouts):
    """AWQ: ours calibrates transformers 5's experts unfused into transformers 4's per-expert
    linears named by the family spec (quantize/moe_blocks.py), modelopt's reference a real
    transformers-4.57 model with its shared expert and gate (Qwen2-MoE) or q/k norms (Qwen3-MoE)."""
    hf_dir, _ = qmodels[family]
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, awq_block_size=group, **CALIB)
    extra = ["--awq-block-size", str(group)] if group else []
    for ours, theirs in ranks_equal_modelopt(hf_dir, tmp_path, calib_file, spec, mo_algo, mo_kv,
                                             layouts, ["--decoder-type", "qwen", *extra]):
        if mo_algo:  # modelopt lists lm_head, the routers and shared-expert gates as a set
            assert sorted(ours.pop("exclude_modules")) == sorted(theirs.pop("exclude_modules"))
            assert ours == theirs
        else:  # weight-only: TensorRT-LLM's defaults, which hold both gates; KV only: none
            assert ours["quant_algo"] == algo and ours["kv_cache_quant_algo"] == \
                theirs["kv_cache_quant_algo"]
            if algo:
                assert {"*router", "*shared_expert_gate"} <= set(ours["exclude_modules"])


@pytest.mark.parametrize("family,algo,group,bound", [
    ("qwen2_moe", "FP8", None, 0.3),
    pytest.param("qwen3_moe", "FP8", None, 0.3, marks=pytest.mark.slow),
    pytest.param("qwen2_moe", "W4A16_AWQ", 64, 0.5, marks=pytest.mark.slow)])
def test_reader_near_hf(tmp_path, qmodels, calib_text, family, algo, group, bound):
    """FP8 / INT4-AWQ experts, shared expert and attention through the reference reader at tp 4
    (moe_tp 2 x moe_ep 2): quantized (not float), within the format's bound of the HF model."""
    from verify.reference import verify

    hf_dir, model = qmodels[family]
    spec = QuantSpec.create(algo, awq_block_size=group, **CALIB)
    calibrated = calibrate(_fresh(hf_dir), spec, calib_text, tokenizer=byte_tokenizer,
                           progress=False)
    cfg = convert_checkpoint(hf_dir, tmp_path / "ck", tp=4, moe_tp=2, moe_ep=2, dtype="float16",
                             quant=spec, calibrated_model=calibrated, progress=False)
    if family == "qwen2_moe":
        assert "transformer.layers.1.mlp.shared_expert_gate" in cfg["quantization"][
            "exclude_modules"]
    ref = trtllm_semantics(model) if family == "qwen3_moe" else model
    ids = torch.tensor([byte_tokenizer(calib_text[:200])])
    report, ok = verify(tmp_path / "ck", ref, input_ids=ids)
    print(f"\n{family} {algo} tp 4 (2 x 2): reader vs HF rel err {report['rel_err']:.3g}")
    assert ok and 1e-3 < report["rel_err"] < bound, report


@pytest.mark.parametrize("flag,expect", [
    (["--nvfp4"], "qwen2_moe with NVFP4 on --target engine is not supported yet"),
    (["--smoothquant", "--sq-recipe", "modelopt"], "qwen2_moe with"),
    (["--target", "pytorch", "--awq"], "qwen2_moe with W4A16_AWQ (group 128) on --target pytorch"),
])
def test_unproven_formats_refused(tmp_path, qmodels, flag, expect):
    hf_dir, _ = qmodels["qwen2_moe"]
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", *flag)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("family,norm", [("qwen2_moe", False), ("qwen3_moe", True)])
def test_per_expert_block_equals_the_fused_block(tmp_path, family, norm):
    """The transformers-4 block AWQ calibrates on (quantize/moe_blocks.py), built from the family
    spec, computes what transformers 5's fused block computes: expert linears named as the spec's
    sources, routing renormalised as HF's norm_topk_prob, Qwen2-MoE's gated shared expert."""
    from examples.tiny import make_tiny_model
    from quantize.moe_blocks import Hf4SparseMoeBlock, unfuse_experts, unfused_blocks

    extra = {"shared_expert_intermediate_size": 512} if family == "qwen2_moe" else {}
    model = make_tiny_model(tmp_path, family=family, **SHAPES, **extra,
                            norm_topk_prob=norm).float().eval()
    x = torch.randn(2, 5, SHAPES["hidden_size"])
    with torch.no_grad():
        want = model.model.layers[0].mlp(x)
    unfuse_experts(model, QuantSpec.create("W4A16_AWQ", **CALIB))
    block = unfused_blocks(model)[0]
    assert isinstance(block, Hf4SparseMoeBlock) and block.renormalize is norm
    assert hasattr(block.experts[0], "gate_proj") and hasattr(block.experts[0], "down_proj")
    assert hasattr(block, "shared_expert_gate") is (family == "qwen2_moe")
    with torch.no_grad():
        got = block(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert sum(block.tokens_seen) == 2 * 5 * SHAPES["num_experts_per_tok"]
