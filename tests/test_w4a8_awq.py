"""W4A8_AWQ (``--awq --awq-act fp8``, quantize/recipes/w4a8_awq): the converter's checkpoint (its
own layer-by-layer calibration) equals nvidia-modelopt 0.47's export_tensorrt_llm_checkpoint of a
whole-model ``mtq.quantize`` with W4A8_AWQ_BETA_CFG, every tensor of every rank, at tp 1 and 2;
the flags, refusals and the padding rule (max(128, group) x tp)."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from convert_helper import convert_checkpoint
from quantize.calibrate import calibrate
from quant_common import TINY, byte_tokenizer
from test_quantize_convert import assert_same_checkpoint, lw, modelopt_export, spec_for


@pytest.mark.parametrize("block,overrides", [(None, {}), (64, {"intermediate_size": 768})],
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
