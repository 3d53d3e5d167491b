"""AWQ with groups wider than the model's features (issue 28's `--awq-block-size 128` on SmolLM2:
hidden 576 = 4.5 groups, 9 heads x 64 = 4.5 groups): the layer-wise calibration runs on the model
laid out as the checkpoint pads it (quantize.calib_padding: the hidden size to whole groups with
the norms rescaled, the heads as --pad-heads pads them), so every group is whole, as in
TensorRT-LLM's padded WeightOnlyGroupwiseQuantLinear.

Oracle: the same model padded by hand in HF terms (an independent restatement: zero heads, zero
hidden features, eps x H / H', norms x sqrt(H / H')) is an ordinary model whose tp-1 AWQ-128
conversion needs no padding; the padded checkpoints give its logits (fp32, 1e-5) and pass
``check``. The tiny shape has SmolLM2's heads (9 / 3 of 64: 4.5 groups, padded to 12 / 4 at tp 2)
and a hidden size that is not whole groups either (288 = 2.25 groups; calibrated at 384, written
at 512) in sizes transformers 5 accepts padded (it refuses a hidden size that is not a
multiple of the head count, which SmolLM2's padded 640 / 12 would be; the real model's run is in
BENCHMARKS.md / the issue notes)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from check.report import check_dir
from convert_helper import convert_checkpoint
from quant_common import byte_tokenizer
from quantize.calib_padding import CalibPad
from quantize.run import CalibrationRun
from verify.reference import ReferenceModel

SHAPE = dict(hidden_size=288, intermediate_size=1024, num_attention_heads=9, num_key_value_heads=3,
             head_dim=64, vocab_size=1000, num_hidden_layers=1, rms_norm_eps=1e-6)


def _spec():
    from quantize.formats import QuantSpec

    return QuantSpec.create("W4A16_AWQ", awq_block_size=128, calib_size=4, calib_seq_len=64,
                            calib_batch_size=2)


def _hand_padded(model, out, hidden, heads, kv_heads):
    """``model`` restated with ``hidden`` features and ``heads`` / ``kv_heads`` (whole zero KV
    groups at the end): every real tensor in the top-left corner of a zero tensor, norm weights
    x sqrt(H / H'), rms_norm_eps x H / H'."""
    from transformers import AutoModelForCausalLM

    real = model.config.hidden_size
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size, cfg.rms_norm_eps = hidden, model.config.rms_norm_eps * real / hidden
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    big = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = big.state_dict()
    for name, t in model.state_dict().items():
        z = torch.zeros_like(sd[name])
        z[tuple(slice(0, n) for n in t.shape)] = \
            t * math.sqrt(real / hidden) if name.endswith("norm.weight") else t
        sd[name] = z
    big.load_state_dict(sd)
    big.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smol_shaped(tmp_path_factory):
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("awq128")
    return d, make_tiny_model(d, **SHAPE).float().eval()


def _run(store, text, reuse=False):
    return CalibrationRun(store=store, device="cpu", calib_text=text, tokenizer=byte_tokenizer,
                          reuse=reuse)


def test_awq128_padded_calibration_equals_the_hand_padded_model(tmp_path, smol_shaped, calib_text):
    """Calibrated at hidden 384 (3 groups) on the heads tp pads to, the checkpoint padded on to
    hidden 512: the hand-padded model (hidden 384, those heads) at tp 1 gives the same logits."""
    tp, padded, heads, kv_heads = 2, 512, 12, 4
    hf_dir, model = smol_shaped
    spec = _spec()
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5032]), byte_tokenizer(calib_text[9000:9032])])
    hand = _hand_padded(model, tmp_path / "hand", 384, heads, kv_heads)
    cfg = convert_checkpoint(hand, tmp_path / "hand_tp1", tp=1, dtype="float32", progress=False,
                             quant=spec, calibration=_run(tmp_path / "hand_store", calib_text))
    assert cfg["hidden_size"] == 384  # nothing to pad: whole groups everywhere
    base = ReferenceModel(tmp_path / "hand_tp1").forward(ids)[..., :1000]
    ck = tmp_path / f"tp{tp}"
    cfg = convert_checkpoint(hf_dir, ck, tp=tp, dtype="float32", progress=False, quant=spec,
                             pad_heads=True, calibration=_run(tmp_path / "store", calib_text))
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == \
        (padded, heads, kv_heads)
    assert cfg["norm_epsilon"] == pytest.approx(1e-6 * 288 / padded, rel=1e-12)
    assert check_dir(ck).exit_code == 0, check_dir(ck).summary()
    logits = ReferenceModel(ck).forward(ids)[..., :1000]
    rel = float((logits - base).norm() / base.norm())
    assert rel < 1e-5, rel


def test_w4a8_padded_features_get_a_neutral_prequant_scale(tmp_path, smol_shaped, calib_text):
    """W4A8 at tp 2 on the SmolLM2-shaped model (hidden and heads padded for the calibration):
    AWQ's search leaves a degenerate scale (~190) on the padded features, which W4A8's
    preprocessing divides by the activation scale in fp16 -- inf, and 0 x inf = NaN logits (found
    on the real SmolLM2). Padded features get 1 instead; the real ones are untouched."""
    from quantize.formats import QuantSpec

    hf_dir, _ = smol_shaped
    spec = QuantSpec.create("W4A8_AWQ", awq_block_size=128, calib_size=4, calib_seq_len=64,
                            calib_batch_size=2)
    ck = tmp_path / "w4a8"
    convert_checkpoint(hf_dir, ck, tp=2, dtype="float16", progress=False, quant=spec,
                       pad_heads=True, calibration=_run(tmp_path / "store", calib_text))
    rank0 = load_file(ck / "rank0.safetensors")
    for lin, real in (("attention.qkv", 288), ("mlp.fc", 288), ("attention.dense", 6 * 64)):
        pqs = rank0[f"transformer.layers.0.{lin}.prequant_scaling_factor"].float()
        act = rank0[f"transformer.layers.0.{lin}.activation_scaling_factor"].float()
        assert torch.all(pqs[real:] == 1) and not torch.all(pqs[:real] == 1), lin
        assert torch.isfinite((pqs / act).half()).all(), lin  # preprocess_weights' fp16 division
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5032])])
    assert torch.isfinite(ReferenceModel(ck).forward(ids)).all()


def test_tp1_is_refused_naming_the_group_that_fits(tmp_path, smol_shaped):
    """At tp 1 nothing pads the heads, and q/k/v's 15 heads x 64 = 960 output features are not whole
    128-feature blocks (TensorRT-LLM pads no activation, so a padded qkv output would not meet
    the attention): refused before any work, as for SmolLM2."""
    from common.errors import UserError

    hf_dir, _ = smol_shaped
    with pytest.raises(UserError, match=r"attention\.qkv's 960 output features would not meet the "
                                        r"model's; no --tp value keeps them whole: try "
                                        r"--awq-block-size 64"):
        convert_checkpoint(hf_dir, tmp_path / "o", tp=1, dtype="float32", progress=False,
                           quant=_spec())
    assert not (tmp_path / "o").exists()


def test_calib_pad_pads_hidden_and_heads_at_the_end_and_rescales_norms():
    pad = CalibPad("llama", 6, 8)
    w = torch.arange(12.0).reshape(2, 6)
    out = pad.tensor("self_attn.q_proj.weight", w, (3, 8))
    assert out.shape == (3, 8) and torch.equal(out[:2, :6], w) and out[2:].abs().sum() == 0 \
        and out[:, 6:].abs().sum() == 0
    norm = pad.tensor("input_layernorm.weight", torch.ones(6), (8,))
    torch.testing.assert_close(norm, torch.tensor([math.sqrt(6 / 8)] * 6 + [0.0, 0.0]))
    bias = pad.tensor("mlp.down_proj.bias", torch.ones(6), (8,))  # not a norm: not rescaled
    assert torch.equal(bias, torch.tensor([1.0] * 6 + [0.0, 0.0]))
    with pytest.raises(ValueError, match="cannot be padded"):
        pad.tensor("self_attn.q_proj.weight", w, (1, 8))
