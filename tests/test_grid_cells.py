"""Cells of README's support grid (tools/support_grid.py) that had no test of their own, each
against the oracle the Llama family's cell has: Mistral and Qwen2 (Llama's recipes on their
specs) and Qwen3's W4A8 / NVFP4 / FP8-rowwise cells, against nvidia-modelopt 0.47's TensorRT-LLM
export / export_hf_checkpoint of the same calibrated model tensor for tensor, or (the SmoothQuant
plugin, FP8 rowwise) against a restatement of TensorRT-LLM's converter; the weight-only engines of
Mistral, Qwen2 and Gemma 2 (TensorRT-LLM quantizes a float checkpoint when it loads it: the float
checkpoint's bytes with the format's quantization block); Gemma 2's SmoothQuant + INT8 KV and the
Qwen-MoE weight-only cells the family tests leave to the other family. tests/support_cells.py
lists them per cell."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from test_moe_quant import CALIB as MOE_CALIB
from test_moe_quant import needs_hf4, ranks_equal_modelopt
import test_qwen_moe_quant
from test_pytorch_target import assert_same_checkpoint as same_unified
from test_qwen3 import QWEN_KEYS
from test_pytorch_target import modelopt_unified, small
from test_quantize_convert import assert_same_checkpoint, lw, spec_for

#: modelopt's decoder_type of each family; the config keys TensorRT-LLM's Qwen converter writes
#: and modelopt's manual config path does not
DECODER = {"mistral": "llama", "qwen2": "qwen", "qwen3": "qwen"}
EXTRA_KEYS = {"mistral": set(), "qwen2": {"qwen_type", "seq_length"}, "qwen3": QWEN_KEYS}
CALIB = dict(calib_size=2, calib_seq_len=32, calib_batch_size=2)
#: tests/test_qwen_moe_quant.py's module fixtures (its tiny Qwen-MoE models and calibration file)
qmodels, calib_file = test_qwen_moe_quant.qmodels, test_qwen_moe_quant.calib_file


def _model(tmp_path, family, **overrides):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    return hf_dir, make_tiny_model(hf_dir, family=family, **dict(TINY, **overrides)).float().eval()


def _modelopt_trtllm(model, out_dir, decoder):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)  # the export re-smooths / pads the model in place
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type=decoder, dtype=torch.float16,
                                   export_dir=out_dir, inference_tensor_parallel=1)
    return out_dir


@pytest.mark.parametrize("family,algo,kv", [
    ("mistral", "W8A8_SQ_PER_CHANNEL", "int8"),
    ("mistral", "FP8", "fp8"),
    pytest.param("mistral", "W4A16_AWQ", None, id="mistral_awq128", marks=pytest.mark.slow),
    pytest.param("mistral", "NVFP4", None, id="mistral_nvfp4", marks=pytest.mark.slow),
    ("qwen2", "FP8", None),
    pytest.param("mistral", "W4A8_AWQ", None, id="mistral_w4a8", marks=pytest.mark.slow),
    pytest.param("qwen2", "W4A8_AWQ", None, id="qwen2_w4a8", marks=pytest.mark.slow),
    pytest.param("qwen3", "W4A8_AWQ", None, id="qwen3_w4a8", marks=pytest.mark.slow),
], ids=["mistral_sq_kv_int8", "mistral_fp8_kv_fp8", "mistral_awq128", "mistral_nvfp4", "qwen2_fp8",
        "mistral_w4a8", "qwen2_w4a8", "qwen3_w4a8"])
def test_engine_cell_equals_modelopt_export(tmp_path, calib_text, family, algo, kv):
    hf_dir, model = _model(tmp_path, family)
    spec = spec_for(algo, kv, **CALIB)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    ours = tmp_path / "ours"
    config = convert_checkpoint(hf_dir, ours, tp=1, dtype="float16", progress=False, quant=spec,
                                calibration=lw(tmp_path, calib_text))
    assert config["quantization"] == spec.to_trtllm_quantization()
    theirs = _modelopt_trtllm(model, tmp_path / "modelopt", DECODER[family])
    assert_same_checkpoint(ours, theirs, extra_config_keys=EXTRA_KEYS[family])


def test_mistral_smoothquant_plugin_equals_trtllm_formulas(tmp_path, calib_text):
    """TensorRT-LLM's plugin SmoothQuant (per channel + per token, the default) on Mistral: every
    tensor equals tests/test_smoothquant_plugin.py's restatement of TensorRT-LLM's converter."""
    from test_smoothquant_plugin import run_case

    hf_dir, model = _model(tmp_path, "mistral")
    run_case(tmp_path, model, hf_dir, calib_text, "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", 1)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_engine_weight_only_is_the_float_checkpoint(tmp_path, family):
    """Hidden 256, MLP 512: every feature a multiple of 64, nothing padded."""
    from builders.cli import main

    hf_dir, _ = _model(tmp_path, family, **({"head_dim": 32} if family == "gemma2" else {}))
    common = ["--model", str(hf_dir), "--checkpoint-only", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "float")]) == 0
    float_rank = (tmp_path / "float" / "checkpoint" / "rank0.safetensors").read_bytes()
    for flag, algo in (("--int8-weight-only", "W8A16"), ("--int4-weight-only", "W4A16")):
        out = tmp_path / algo
        assert main([*common, "--output", str(out), flag]) == 0
        cfg = json.loads((out / "checkpoint" / "config.json").read_text())
        assert cfg["quantization"]["quant_algo"] == algo
        assert (out / "checkpoint" / "rank0.safetensors").read_bytes() == float_rank


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_pytorch_float_and_int8_weight_only_equal_export_hf_checkpoint(tmp_path, family):
    import modelopt.torch.quantization as mtq

    from quantize.unified import write_unified_checkpoint

    hf_dir, model = _model(tmp_path, family)
    write_unified_checkpoint(hf_dir, tmp_path / "float", small(), progress=False)
    same_unified(tmp_path / "float", modelopt_unified(model, tmp_path / "mo_float", torch.float32))
    write_unified_checkpoint(hf_dir, tmp_path / "w8a16", small("W8A16"), progress=False)
    ref = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
    same_unified(tmp_path / "w8a16", modelopt_unified(ref, tmp_path / "mo_w8a16", torch.float32))


@pytest.mark.parametrize("family,algo,kv", [
    pytest.param("mistral", "W8A8_SQ_PER_CHANNEL", None, id="mistral_sq"),
    pytest.param("mistral", "FP8", "fp8", id="mistral_fp8_kv_fp8"),
    pytest.param("mistral", "W4A16_AWQ", None, id="mistral_awq", marks=pytest.mark.slow),
    pytest.param("qwen2", "W8A8_SQ_PER_CHANNEL", None, id="qwen2_sq"),
    pytest.param("qwen2", "FP8", "fp8", id="qwen2_fp8_kv_fp8"),
    pytest.param("qwen2", "W4A16_AWQ", None, id="qwen2_awq", marks=pytest.mark.slow),
    pytest.param("mistral", "NVFP4", "nvfp4", id="mistral_nvfp4_kv_nvfp4", marks=pytest.mark.slow),
    pytest.param("qwen2", "NVFP4", "nvfp4", id="qwen2_nvfp4_kv_nvfp4"),
    pytest.param("qwen3", "NVFP4", "nvfp4", id="qwen3_nvfp4_kv_nvfp4"),
    pytest.param("mistral", "W4A8_AWQ", None, id="mistral_w4a8", marks=pytest.mark.slow),
    pytest.param("qwen2", "W4A8_AWQ", None, id="qwen2_w4a8", marks=pytest.mark.slow),
    pytest.param("qwen3", "W4A8_AWQ", None, id="qwen3_w4a8", marks=pytest.mark.slow),
])
def test_pytorch_cell_equals_export_hf_checkpoint(tmp_path, calib_text, family, algo, kv):
    from quantize.unified import write_unified_checkpoint

    hf_dir, model = _model(tmp_path, family)
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, **CALIB)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibrated_model=model,
                             progress=False)
    same_unified(tmp_path / "ours", modelopt_unified(model, tmp_path / "modelopt", torch.float32))


def test_gemma2_smoothquant_int8_kv_equals_modelopt_export(tmp_path, calib_text):
    """Gemma 2 as Gemma 3's SmoothQuant + INT8 KV test (tests/test_gemma.py), at tp 1: every
    tensor modelopt exports, bit for bit; lm_head is the one difference by design (modelopt
    shares the embedding table, TensorRT-LLM's Gemma converter writes it)."""
    from safetensors.torch import load_file

    from examples.tiny import make_tiny_model
    from test_gemma import modelopt_gemma_export

    hf_dir = tmp_path / "hf"  # the tiny Gemma 2 of tests/test_gemma.py
    model = make_tiny_model(hf_dir, family="gemma2", intermediate_size=256).float().eval()
    spec = spec_for("W8A8_SQ_PER_CHANNEL", "int8", **CALIB)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    config = convert_checkpoint(hf_dir, tmp_path / "ours", tp=1, dtype="float16", progress=False,
                                quant=spec, calibration=lw(tmp_path, calib_text))
    assert config["quantization"] == spec.to_trtllm_quantization()
    ours = load_file(tmp_path / "ours" / "rank0.safetensors")
    theirs = load_file(modelopt_gemma_export(model, tmp_path / "modelopt", 1) / "rank0.safetensors")
    assert sorted(ours) == sorted([*theirs, "lm_head.weight"])
    for name, b in theirs.items():
        assert (ours[name].shape, ours[name].dtype) == (b.shape, b.dtype), name
        assert torch.equal(ours[name], b), name


@needs_hf4
@pytest.mark.slow
@pytest.mark.parametrize("family,algo,kv", [("qwen3_moe", "W8A16", "int8"),
                                            ("qwen2_moe", "W4A16", None)],
                         ids=["q3_w8a16_kv_int8", "q2_w4a16"])
def test_moe_weight_only_cell_equals_modelopt_export(tmp_path, qmodels, calib_file, family, algo,
                                                     kv):
    """The Qwen-MoE weight-only cells tests/test_qwen_moe_quant.py leaves to the other family, at
    tp 1: modelopt's export (a float one, weight-only: TensorRT-LLM quantizes at load) rank for
    rank, with its KV-cache scales."""
    hf_dir, _ = qmodels[family]
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, **MOE_CALIB)
    for ours, theirs in ranks_equal_modelopt(hf_dir, tmp_path, calib_file, spec, None, kv,
                                             [(1, None, None)], ["--decoder-type", "qwen"]):
        assert ours["quant_algo"] == algo
        assert ours["kv_cache_quant_algo"] == theirs["kv_cache_quant_algo"]


def _fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-LLM's fp8_per_channel_quant_weight_gpu, restated (clamp 1200, per row
    scale = max(amax / 448, 1 / (448 * 512)), e4m3); tests/test_fp8_rowwise.py has the sources."""
    x = torch.clamp(w.to(torch.float32), -1200.0, 1200.0)
    s = torch.maximum(x.abs().amax(dim=1, keepdim=True) / 448.0, torch.tensor(1.0 / (448 * 512)))
    return torch.clamp(x / s, -448.0, 448.0).to(torch.float8_e4m3fn), s[:, 0]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_fp8_rowwise_equals_trtllm_restatement(tmp_path, family):
    """--fp8-rowwise (TensorRT-LLM's MLP-only recipe) at tp 1: each MLP weight as TensorRT-LLM's
    converter quantizes it (e4m3 per row, float32 per_channel_scale); every other tensor the
    float checkpoint's."""
    from safetensors.torch import load_file

    from quantize.formats import QuantSpec

    hf_dir, model = _model(tmp_path, family, intermediate_size=192)
    convert_checkpoint(hf_dir, tmp_path / "float", dtype="float16", progress=False)
    convert_checkpoint(hf_dir, tmp_path / "ck", dtype="float16", progress=False,
                       quant=QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN", recipe_option="mlp"))
    got = load_file(tmp_path / "ck" / "rank0.safetensors")
    flt = load_file(tmp_path / "float" / "rank0.safetensors")
    sd = model.state_dict()
    mlp = {"mlp.fc": "gate_proj", "mlp.gate": "up_proj", "mlp.proj": "down_proj"}
    for layer in range(model.config.num_hidden_layers):
        for ours, hf in mlp.items():
            name = f"transformer.layers.{layer}.{ours}"
            q, s = _fp8_per_channel(sd[f"model.layers.{layer}.mlp.{hf}.weight"].to(torch.float16))
            assert torch.equal(got.pop(f"{name}.weight").view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(got.pop(f"{name}.per_channel_scale"), s), name
            flt.pop(f"{name}.weight")
    assert sorted(got) == sorted(flt)
    for k, v in flt.items():
        assert torch.equal(got[k], v), k
