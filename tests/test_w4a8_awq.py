"""W4A8_AWQ (``--awq --awq-act fp8``, quantize/recipes/w4a8_awq): the converter's checkpoint (its
own layer-by-layer calibration) equals nvidia-modelopt 0.47's export_tensorrt_llm_checkpoint of a
whole-model ``mtq.quantize`` with W4A8_AWQ_BETA_CFG, every tensor of every rank, at tp 1 and 2;
the flags, refusals and the padding rule (max(128, group) x tp)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from check import check_dir
from convert_helper import convert_checkpoint
from quantize.run import CalibrationRun
from verify.reference import ReferenceModel, compare_with_hf
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from quant_common import TINY, byte_tokenizer
from test_quantize_convert import assert_same_checkpoint, lw, modelopt_export, spec_for


@pytest.mark.parametrize("block,overrides", [
    (None, {}), pytest.param(64, {"intermediate_size": 768}, marks=pytest.mark.slow)],
    ids=["group128", "group64_inter768"])
def test_w4a8_checkpoint_equals_modelopt_export(tmp_path, calib_text, block, overrides):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **dict(TINY, **overrides)).float().eval()
    spec = spec_for("W4A8_AWQ", None, block)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        config = convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False,
                                    quant=spec, calibration=lw(tmp_path, calib_text))
        assert config["quantization"] == spec.to_trtllm_quantization()
        theirs = modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp)
        assert_same_checkpoint(ours, theirs)
        names = load_file(theirs / "rank0.safetensors")  # the FP8 stages are there to compare
        for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
            for suffix in ("weights_scaling_factor_2", "activation_scaling_factor"):
                assert names[f"transformer.layers.1.{lin}.{suffix}"].shape == (1,)


# --- the padding rule, TensorRT-LLM's declared parameters, the reader ---------------------------


@pytest.fixture(scope="module")
def w4a8_ckpts(tmp_path_factory, calib_text):
    """{tp: checkpoint} of one tiny model whose intermediate size (640) is a multiple of 128 (tp 1)
    but not of max(128, group 128) x 2 = 256 (tp 2: padded to 768), and the HF directory."""
    from examples.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("w4a8")
    make_tiny_model(root / "hf", **dict(TINY, intermediate_size=640))
    spec = spec_for("W4A8_AWQ")
    run = CalibrationRun(store=root / "calibration", temporary=False, device="cpu",
                         calib_text=calib_text, tokenizer=byte_tokenizer)
    for tp in (1, 2):
        convert_checkpoint(root / "hf", root / f"tp{tp}", tp=tp, dtype="float16", progress=False,
                           quant=spec, calibration=run)
    return {tp: root / f"tp{tp}" for tp in (1, 2)}, root / "hf"


def test_padding_is_max_128_group_times_tp_and_exact(w4a8_ckpts, calib_text):
    """tp 2 pads the MLP's intermediate features 640 -> 768 (W4A16 would keep 640: max(64, 128) x 2
    = 256 as well, but at group 64, 128 divides 640); the padded checkpoint reads as the unpadded
    tp-1 one (zero rows and columns add nothing)."""
    ckpts, _ = w4a8_ckpts
    r0 = load_file(ckpts[2] / "rank0.safetensors")
    assert r0["transformer.layers.0.mlp.fc.weight"].shape == (768 // 2 // 2, 256)   # packed int4
    assert r0["transformer.layers.0.mlp.proj.weight"].shape == (256 // 2, 768 // 2)
    assert r0["transformer.layers.0.mlp.proj.weights_scaling_factor"].shape == (256, 768 // 2 // 128)
    assert load_file(ckpts[1] / "rank0.safetensors")["transformer.layers.0.mlp.fc.weight"].shape == (
        640 // 2, 256)
    ids = torch.tensor([byte_tokenizer(calib_text[3000:3064])])
    a = ReferenceModel(ckpts[1]).forward(ids)
    b = ReferenceModel(ckpts[2]).forward(ids)
    assert float((a - b).norm() / a.norm()) < 1e-3


def test_check_passes_with_tensorrt_llm_w4a8_parameters(w4a8_ckpts):
    """``check`` interprets config.json as TensorRT-LLM declares W4A8_AWQ (alpha on every groupwise
    linear, activation_scaling_factor on the row linears, features padded to 128 x tp) and applies
    preprocess_weights' W4A8 step: both checkpoints pass; the only warnings are the activation
    scales preprocess_weights puts back on the column linears, which declare none."""
    ckpts, _ = w4a8_ckpts
    for tp, ckpt in ckpts.items():
        result = check_dir(ckpt)
        assert result.exit_code == 0, result.summary()
        other = [f for f in result.findings if f.kind not in ("dtype", "extra")]
        assert not other, result.summary()
        warnings = [f.message for f in result.findings if f.kind == "extra"]  # one a rank
        assert len(warnings) == tp
        extra = {n.split(".", 3)[-1] for w in warnings for n in re.findall(r"'([^']+)'", w)}
        assert extra == {"attention.qkv.activation_scaling_factor", "mlp.fc.activation_scaling_factor",
                         "mlp.gate.activation_scaling_factor"}, extra


def test_check_refuses_a_w4a8_checkpoint_without_its_second_weight_scale(w4a8_ckpts, tmp_path):
    ckpts, _ = w4a8_ckpts
    bad = tmp_path / "bad"
    shutil.copytree(ckpts[1], bad)
    t = load_file(bad / "rank0.safetensors")
    del t["transformer.layers.1.mlp.proj.weights_scaling_factor_2"]
    save_file(t, bad / "rank0.safetensors")
    result = check_dir(bad)
    assert result.exit_code == 1
    assert ("KeyError in preprocess_weights (W4A8_AWQ): "
            "transformer.layers.1.mlp.proj.weights_scaling_factor_2 is missing") in result.summary()


def test_reader_and_quality_gate_report_w4a8(w4a8_ckpts, calib_text):
    """The reader runs the checkpoint (int4 weights, e4m3 inputs) near the float model, further
    from it than the W4A16 rounding alone would be; the quality gate measures it."""
    from verify.quality_gate import measure

    ckpts, hf_dir = w4a8_ckpts
    r = compare_with_hf(ckpts[2], hf_dir, input_ids=torch.tensor([byte_tokenizer(calib_text[3000:3064])]))
    assert r["rel_err"] < 0.6 and r["argmax_agreement"] >= 0.3, r
    m = measure(ckpts[2], hf_dir, byte_tokenizer(calib_text[:4000]), seq_len=64)
    assert m["ppl"] > 0 and m["float_ppl"] > 0 and 0 <= m["top1_agreement"] <= 1, m


# --- flags and refusals ---------------------------------------------------------------------------


def _spec(*argv):
    from builders.cli_args import build_parser

    return QuantSpec.from_args(build_parser().parse_args(["--output", "o", *argv]))


def test_flags_select_w4a8_and_its_modelopt_config():
    spec = _spec("--awq", "--awq-act", "fp8", "--awq-block-size", "64")
    assert (spec.quant_algo, spec.group_size, spec.name) == ("W4A8_AWQ", 64, "W4A8_AWQ (group 64)")
    assert spec.to_trtllm_quantization() == {  # modelopt 0.47's process_layer_quant_config keys
        "quant_algo": "W4A8_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
        "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
    assert _spec("--awq").quant_algo == "W4A16_AWQ"
    cfg = spec.format.modelopt_config(spec)
    wq = next(e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    assert wq["cfg"][0]["block_sizes"][-1] == 64 and wq["cfg"][1] == {"num_bits": (4, 3), "axis": None}
    assert cfg["algorithm"] == "awq_lite"
    assert spec.format.feature_multiple(spec) == 128 and _spec("--awq").format.feature_multiple(
        _spec("--awq")) == 128  # W4A16 at group 128: max(64, 128)
    assert spec.format.feature_multiple(_spec("--awq", "--awq-block-size", "64")) == 128


@pytest.mark.parametrize("argv,message", [
    (["--awq-act", "fp8"], "--awq-act applies to --awq; add it or drop the flag"),
    (["--smoothquant", "--awq-act", "fp8"], "--awq-act applies to --awq; add it or drop the flag"),
    (["--awq", "--awq-act", "fp8", "--sq-recipe", "modelopt"],
     "--sq-recipe applies to --smoothquant; add it or drop the flag"),
    (["--awq", "--awq-act", "fp8", "--awq-block-size", "32"],
     "--awq-block-size 32 is not supported by TensorRT-LLM's INT4 group-wise kernels; use one of 64, 128"),
])
def test_flag_refusals(argv, message):
    from common.errors import UserError

    with pytest.raises(UserError) as e:
        _spec(*argv)
    assert str(e.value) == message


def test_experts_refused_in_one_line():
    from common.errors import UserError

    spec = spec_for("W4A8_AWQ")
    with pytest.raises(UserError, match=r"^--awq --awq-act fp8 \(W4A8_AWQ\) is not supported for "
                                        r"mixture-of-experts models yet"):
        spec.format.moe.preflight(spec, None, None)


# --- --target pytorch: modelopt's unified checkpoint ----------------------------------------------


@pytest.mark.parametrize("kv", [None, pytest.param("fp8", marks=pytest.mark.slow)])
def test_unified_checkpoint_equals_modelopt_export_hf_checkpoint(tmp_path, calib_text, kv):
    """``--target pytorch``: the unified checkpoint (whole model calibrated in memory) equals
    modelopt 0.47's export_hf_checkpoint: packed int4 ``weight``, ``weight_scale`` per group,
    ``weight_scale_2`` and ``input_scale`` (FP8), q/k/v and gate/up pre-quant scales folded into
    the norms, hf_quant_config.json and config.json's quantization_config."""
    from quantize.unified.checkpoint import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint as same_unified, make_model, modelopt_unified

    hf_dir, model = make_model(tmp_path)
    spec = spec_for("W4A8_AWQ", kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibrated_model=model, progress=False)
    ours = same_unified(tmp_path / "ours", modelopt_unified(model, tmp_path / "modelopt", torch.float32))
    assert ours["model.layers.0.mlp.down_proj.weight_scale_2"].shape == ()
    assert ours["model.layers.0.self_attn.q_proj.input_scale"].shape == ()
