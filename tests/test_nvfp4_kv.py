"""--kv-cache-dtype nvfp4: an NVFP4 KV cache where TensorRT-LLM 1.2 takes one, its PyTorch backend
(``--target pytorch``; the engine target refuses it in one line, check/gpu.py). The unified
checkpoint equals nvidia-modelopt 0.47's export_hf_checkpoint of the same model calibrated with
``NVFP4_KV_CFG`` (``k_proj.k_scale`` / ``v_proj.v_scale`` = amax / 448, hf_quant_config.json's
``kv_cache_quant_algo`` "NVFP4", config.json's ``kv_cache_scheme`` "NVFP4"), layer by layer from
the calibration store and whole-model, beside NVFP4 and FP8 weights; the reader's NVFP4 cache
kernel equals modelopt's own fake quantization of the keys and values."""
from __future__ import annotations

import json

import pytest
import torch

from quant_common import byte_tokenizer
from quantize.calibrate import calibrate
from test_quantize_convert import spec_for


@pytest.mark.parametrize("algo", ["NVFP4", "FP8"])
def test_unified_checkpoint_equals_export_hf_checkpoint(tmp_path, calib_text, algo):
    from quantize.run import CalibrationRun
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, make_model, modelopt_unified

    hf_dir, model = make_model(tmp_path)
    spec = spec_for(algo, "nvfp4")
    assert spec.format.unified_layerwise(spec)
    run = CalibrationRun(store=tmp_path / "calibration", device="cpu", calib_text=calib_text,
                         tokenizer=byte_tokenizer)
    write_unified_checkpoint(hf_dir, tmp_path / "store", spec, calibration=run, progress=False)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    tensors = assert_same_checkpoint(tmp_path / "store", theirs)
    if algo == "NVFP4":  # whole-model, from the calibrated model in memory
        assert_same_checkpoint(_whole(hf_dir, tmp_path / "whole", spec, model), theirs)
    q = json.loads((tmp_path / "store" / "hf_quant_config.json").read_text())["quantization"]
    assert q["kv_cache_quant_algo"] == "NVFP4"
    cfg = json.loads((tmp_path / "store" / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"] == "NVFP4"
    k_amax = model.model.layers[1].self_attn.k_bmm_quantizer.amax.float()
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.k_scale"], (k_amax / 448).reshape(()))


def _whole(hf_dir, out, spec, model):
    from quantize.unified import write_unified_checkpoint

    write_unified_checkpoint(hf_dir, out, spec, calibrated_model=model, progress=False)
    return out
