"""awq_lite's search pass layer by layer (quantize/awq_search.py): each linear's losses come from
the recorded inputs of every batch, each alpha's weight fake-quantized once; the checkpoint still
equals modelopt's export of a whole-model ``mtq.quantize`` bit for bit, here with four calibration
batches of one sample (the loss sums over batches in batch order), with and without an FP8 KV
cache (whose quantizers are on during the search pass)."""
from __future__ import annotations

import pytest

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from test_quantize_convert import assert_same_checkpoint, lw, modelopt_export, spec_for


@pytest.mark.parametrize("kv", [None, "fp8"], ids=["awq64", "awq64_kv_fp8"])
def test_awq_search_over_four_batches_equals_modelopt_export(tmp_path, calib_text, monkeypatch, kv):
    import quantize.awq_search as awq_search
    from examples.tiny import make_tiny_model
    from quantize.calibrate import calibrate

    searched = []
    real = awq_search._search_linear

    def counting(m, xs):
        searched.append(len(xs))
        return real(m, xs)

    monkeypatch.setattr(awq_search, "_search_linear", counting)
    hf = tmp_path / "hf"
    model = make_tiny_model(hf, **dict(TINY, intermediate_size=640)).float().eval()
    spec = spec_for("W4A16_AWQ", kv, 64, calib_batch_size=1)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    ours = tmp_path / "ours"
    convert_checkpoint(hf, ours, tp=2, dtype="float16", progress=False, quant=spec,
                       calibration=lw(tmp_path, calib_text))
    assert searched == [4] * 7 * TINY["num_hidden_layers"]  # every linear, all 4 batches at once
    assert_same_checkpoint(ours, modelopt_export(model, tmp_path / "modelopt", 2))
