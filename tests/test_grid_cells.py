"""Cells of README's support grid (tools/support_grid.py) that had no test of their own: Mistral
and Qwen2, which take Llama's recipes, on both targets, against the oracle Llama's cells have
(nvidia-modelopt 0.47's TensorRT-LLM export / export_hf_checkpoint of the same calibrated model,
tensor for tensor), and the weight-only engine cells of Mistral, Qwen2 and Gemma 2 (TensorRT-LLM
quantizes a float checkpoint itself when it loads it: the checkpoint is the float one's bytes with
the format's quantization block). tests/support_cells.py lists them per cell."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from test_pytorch_target import assert_same_checkpoint as same_unified
from test_pytorch_target import modelopt_unified, small
from test_quantize_convert import assert_same_checkpoint, lw, spec_for

#: modelopt's decoder_type of each family; the config keys TensorRT-LLM's Qwen converter writes
#: and modelopt's manual config path does not
DECODER = {"mistral": "llama", "qwen2": "qwen"}
EXTRA_KEYS = {"mistral": set(), "qwen2": {"qwen_type", "seq_length"}}
CALIB = dict(calib_size=2, calib_seq_len=32, calib_batch_size=2)


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
], ids=["mistral_sq_kv_int8", "mistral_fp8_kv_fp8", "mistral_awq128", "mistral_nvfp4", "qwen2_fp8"])
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
    pytest.param("mistral", "NVFP4", None, id="mistral_nvfp4", marks=pytest.mark.slow),
    pytest.param("qwen2", "NVFP4", None, id="qwen2_nvfp4"),
    pytest.param("qwen3", "NVFP4", None, id="qwen3_nvfp4"),
])
def test_pytorch_cell_equals_export_hf_checkpoint(tmp_path, calib_text, family, algo, kv):
    from quantize.unified import write_unified_checkpoint

    hf_dir, model = _model(tmp_path, family)
    spec = small(algo, kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibrated_model=model,
                             progress=False)
    same_unified(tmp_path / "ours", modelopt_unified(model, tmp_path / "modelopt", torch.float32))
