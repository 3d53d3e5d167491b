"""The layer-wise ``max`` calibration by forward hooks (quantize/max_layerwise.py: FP8, KV caches
alone): that FP8 and KV-only layer-wise calibrations take it (not modelopt's per-layer
``mtq.quantize``), that its key/value maxima are taken on the eager attention path as on the
registered (sdpa) one, and its one-line refusal of non-finite activations. Its equality with
modelopt's export on the sdpa path (FP8 + FP8 KV, INT8 KV only, bf16, Qwen2 bias, pp, kv-head
duplication) is in tests/test_quantize_convert.py."""
from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from test_quantize_convert import assert_same_checkpoint, lw, modelopt_export, spec_for


@pytest.mark.parametrize("algo,kv", [("FP8", None), (None, "fp8")], ids=["fp8", "kv_fp8_only"])
def test_max_formats_calibrate_by_hooks_not_modelopt(tmp_path, calib_text, monkeypatch, algo, kv):
    import quantize.layerwise as layerwise
    from examples.tiny import make_tiny_model

    def no_modelopt(*a, **k):
        raise AssertionError("a max-calibrated format went through modelopt's mtq.quantize")

    monkeypatch.setattr(layerwise, "_modelopt_layer", no_modelopt)
    make_tiny_model(tmp_path / "hf", **TINY)
    spec = spec_for(algo, kv)
    assert spec.is_max_calibrated
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", dtype="float16", progress=False,
                       quant=spec, calibration=lw(tmp_path, calib_text))
    assert (tmp_path / "out" / "rank0.safetensors").is_file()


def test_fp8_kv_on_eager_attention_equals_modelopt_export(tmp_path, calib_text, monkeypatch):
    """With ``_attn_implementation = "eager"`` modelopt (and our hooks) read the key/value states
    at the module's ``eager_attention_forward`` instead of the registered interface."""
    import quantize.layerwise as layerwise
    from examples.tiny import make_tiny_model
    from quantize.calibrate import calibrate

    real = layerwise.meta_model

    def eager_meta(hf_dir, dtype, pad=None):
        model = real(hf_dir, dtype, pad)
        model.config._attn_implementation = "eager"
        return model

    monkeypatch.setattr(layerwise, "meta_model", eager_meta)
    hf = tmp_path / "hf"
    model = make_tiny_model(hf, **TINY).float().eval()
    model.config._attn_implementation = "eager"
    spec = spec_for("FP8", "fp8")
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    ours = tmp_path / "ours"
    convert_checkpoint(hf, ours, tp=2, dtype="float16", progress=False, quant=spec,
                       calibration=lw(tmp_path, calib_text))
    assert_same_checkpoint(ours, modelopt_export(model, tmp_path / "modelopt", 2))


def test_non_finite_activations_are_refused_in_one_line():
    from quantize.max_layerwise import MaxRecord

    rec = MaxRecord((4, 3), "model.layers.3.mlp.down_proj's input")
    rec.collect(torch.tensor([0.5, -2.0]))
    assert float(rec.amax) == 2.0 and rec.export_amax().shape == (1,)
    with pytest.raises(UserError, match=r"^model\.layers\.3\.mlp\.down_proj's input has "
                                        r"non-finite values during calibration"):
        rec.collect(torch.tensor([1.0, float("inf")]))
