"""TensorRT-LLM's weight-only / AWQ feature padding (quantize.apply.pad_features, quantize.feature_padding,
convert.shard column/row): TensorRT-LLM 1.x's WeightOnlyQuantLinear / RowLinear (64 x tp) and
WeightOnlyGroupwiseQuantLinear / RowLinear (max(64, group) x tp) declare every linear's full
features rounded up to that multiple and pad no activation, so the checkpoint holds the MLP's
intermediate features padded with zeros (exact); the hidden size is padded too
(tests/test_hidden_padding.py), and a model whose q/k/v heads would be padded is refused before
any work with the --tp values that work.

The tiny model: hidden 512, 8 heads / 4 KV heads of 64, intermediate 640 (5 x 128), so at tp 4
every format pads 640 -> 768 (64 x 4) or 1024 (AWQ group 128: 128 x 4 x 2), and AWQ-128 pads at
tp 2 too (640 -> 768). The reader runs the padded ranks as TensorRT-LLM runs them (the padded
GEMMs on the padded intermediate activations, nothing sliced) and must give the unpadded tp-1
checkpoint's logits in float32.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize.feature_padding import pad_feature_state
from convert_helper import convert_checkpoint
from quant_common import calibrated_if_needed, byte_tokenizer, same_row_max_on_every_rank
from verify.reference import ReferenceModel

TINY = dict(hidden_size=512, intermediate_size=640, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=1000, num_hidden_layers=1)
L0 = "transformer.layers.0.mlp."


def _spec(algo, block=None):
    from quantize.formats import QuantSpec

    return QuantSpec.create(algo, awq_block_size=block, calib_size=4, calib_seq_len=64,
                            calib_batch_size=2)


@pytest.fixture
def hf(tmp_path_factory):
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("hf")
    # columns in every tp 1 / 2 / 4 slice of o_proj's 512 and down_proj's 640 inputs
    model = same_row_max_on_every_rank(make_tiny_model(d, **TINY).float().eval(),
                                       (0, 130, 260, 390), (0, 200, 400, 600))
    model.save_pretrained(d)
    return d, model


def _logits(ck, ids):
    return ReferenceModel(ck).forward(ids)[..., :1000]


# (algo, AWQ block, tp -> padded intermediate size)
CASES = {"w8a16": ("W8A16", None, {2: 640, 4: 768}), "w4a16": ("W4A16", None, {2: 640, 4: 768}),
         "awq64": ("W4A16_AWQ", 64, {2: 640, 4: 768}), "awq128": ("W4A16_AWQ", 128, {2: 768, 4: 1024})}


@pytest.mark.parametrize("case", list(CASES))
def test_padded_checkpoint_gives_the_unpadded_tp1_logits(tmp_path, hf, calib_text, case):
    """Padded tp 2 / 4 logits equal the tp-1 checkpoint's (fp32, 1e-5); the ranks have the
    declared shapes and neutral padding; AWQ's real features equal modelopt's own export."""
    algo, block, padded = CASES[case]
    hf_dir, model = hf
    spec = _spec(algo, block)
    calibrated = calibrated_if_needed(model, spec, calib_text)
    kw = dict(dtype="float32", progress=False, quant=spec, calibrated_model=calibrated)
    convert_checkpoint(hf_dir, tmp_path / "tp1", tp=1, **kw)
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5032]), byte_tokenizer(calib_text[9000:9032])])
    base = _logits(tmp_path / "tp1", ids)
    theirs = _modelopt_tp1_export(calibrated, tmp_path / "modelopt") if calibrated else None
    for tp, inter in padded.items():
        ck = tmp_path / f"tp{tp}"
        cfg = convert_checkpoint(hf_dir, ck, tp=tp, **kw)
        assert cfg["intermediate_size"] == 640  # TensorRT-LLM pads from the real size itself
        _check_padded_ranks(ck, tp, inter, packed=block is not None, group=block)
        rel = float((_logits(ck, ids) - base).norm() / base.norm())
        assert rel < 1e-5, (tp, rel)
        if theirs is not None:
            _real_features_equal_modelopt(ck, tp, theirs)


def _modelopt_tp1_export(model, out):
    """modelopt 0.47's own TensorRT-LLM export of the calibrated model at tp 1 (it pads nothing:
    at the padded layouts its split would cut AWQ groups, so the comparison is with tp 1)."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type="llama", dtype=torch.float32, export_dir=out,
                                   inference_tensor_parallel=1)
    return load_file(out / "rank0.safetensors")


def _real_features_equal_modelopt(ck, tp, theirs):
    """Our padded ranks joined along the split and cut to the real features (packed int4 rows:
    320) equal modelopt's unpadded tensors bit for bit; what was cut is the padding, checked by
    _check_padded_ranks."""
    ranks = [load_file(ck / f"rank{r}.safetensors") for r in range(tp)]
    for name, b in theirs.items():
        if ".mlp." not in name:
            continue
        column = ".mlp.fc." in name or ".mlp.gate." in name
        if column and name.endswith("prequant_scaling_factor"):  # over the hidden input: whole
            a = ranks[0][name]
        else:
            a = torch.cat([t[name] for t in ranks], dim=0 if column else -1)
            a = a[:b.shape[0]] if column else a[..., :b.shape[-1]]
        # modelopt 0.47 writes the pre-quant scales in float16 whatever the export dtype; ours
        # are the float32 checkpoint's: compared in modelopt's dtype
        assert torch.equal(a.to(b.dtype), b), name


def _check_padded_ranks(ck, tp, inter, *, packed, group):
    """Every rank's fc / gate / proj tensors have TensorRT-LLM's declared per-rank shapes (the
    checkpoint's, before preprocess_weights), the padded features at the end of the full dim:
    zero weights, scales and pre-quant scales 1."""
    per = inter // tp
    for r in range(tp):
        t = load_file(ck / f"rank{r}.safetensors")
        real = max(0, min(per, 640 - r * per))  # real features on this rank, the rest padding
        fc, proj = t[L0 + "fc.weight"], t[L0 + "proj.weight"]
        rows = per // 2 if packed else per  # AWQ: two int4 a byte along the output features
        assert fc.shape == (rows, 512) and t[L0 + "gate.weight"].shape == (rows, 512)
        assert proj.shape == (256 if packed else 512, per)
        real_rows = real // 2 if packed else real
        assert fc[real_rows:].abs().sum() == 0 and t[L0 + "gate.weight"][real_rows:].abs().sum() == 0
        assert proj[:, real:].abs().sum() == 0
        if real:
            assert fc[:real_rows].abs().sum() > 0 and proj[:, :real].abs().sum() > 0
        if group:
            fs, ps = t[L0 + "fc.weights_scaling_factor"], t[L0 + "proj.weights_scaling_factor"]
            pq = t[L0 + "proj.prequant_scaling_factor"]
            assert fs.shape == (per, 512 // group) and ps.shape == (512, per // group)
            assert pq.shape == (per,)
            assert torch.all(fs[real:] == 1) and torch.all(ps[:, real // group:] == 1)
            assert torch.all(pq[real:] == 1)


def test_padding_that_is_not_zero_is_caught(tmp_path, hf):
    """The check can fail: the padded proj columns made non-zero change the logits (the padded
    fc / gate outputs are then still zero, so the padded intermediate rows must be non-zero too)."""
    hf_dir, _ = hf
    spec = _spec("W8A16")
    convert_checkpoint(hf_dir, tmp_path / "tp1", tp=1, dtype="float32", progress=False, quant=spec)
    ck = tmp_path / "tp4"
    convert_checkpoint(hf_dir, ck, tp=4, dtype="float32", progress=False, quant=spec)
    f = ck / "rank3.safetensors"  # intermediate 576..640 real, 640..768 padding
    sd = load_file(f)
    sd[L0 + "fc.weight"][64:] = 0.05
    sd[L0 + "gate.weight"][64:] = 0.05
    sd[L0 + "proj.weight"][:, 64:] = 0.05
    save_file(sd, f)
    ids = torch.tensor([list(range(32))])
    base = _logits(tmp_path / "tp1", ids)
    rel = float((_logits(ck, ids) - base).norm() / base.norm())
    assert rel > 1e-3, rel


def test_feature_state_padding_follows_the_table():
    """Calibrated tensors (HF names, unsharded): gate/up rows and their scales, down_proj input
    columns, its 2-D group scales and pre-quant scale; zero weights, neutral (1) scales; the
    rest left alone."""
    from types import SimpleNamespace

    shape = SimpleNamespace(inter=4, padded_inter=8)
    pre = "model.layers.0.mlp."
    state = {pre + "gate_proj.weight": torch.ones(2, 3, dtype=torch.int8),          # packed int4
             pre + "up_proj.weights_scaling_factor": torch.full((4, 3), 2.0),
             pre + "gate_proj.prequant_scaling_factor": torch.full((3,), 3.0),       # hidden input
             pre + "down_proj.weight": torch.ones(3, 4),
             pre + "down_proj.weights_scaling_factor": torch.full((3, 2), 2.0),      # group 2
             pre + "down_proj.prequant_scaling_factor": torch.full((4,), 3.0),
             "model.layers.0.self_attn.q_proj.weight": torch.ones(6, 3)}
    out = pad_feature_state(state, shape)
    assert out[pre + "gate_proj.weight"].shape == (4, 3) and out[pre + "gate_proj.weight"][2:].sum() == 0
    assert torch.equal(out[pre + "up_proj.weights_scaling_factor"][4:], torch.ones(4, 3))
    assert out[pre + "down_proj.weight"].shape == (3, 8) and out[pre + "down_proj.weight"][:, 4:].sum() == 0
    assert torch.equal(out[pre + "down_proj.weights_scaling_factor"][:, 2:], torch.ones(3, 2))
    assert torch.equal(out[pre + "down_proj.prequant_scaling_factor"][4:], torch.ones(4))
    for same in ("gate_proj.prequant_scaling_factor",):
        assert out[pre + same] is state[pre + same]
    assert out["model.layers.0.self_attn.q_proj.weight"] is state["model.layers.0.self_attn.q_proj.weight"]
    assert pad_feature_state(state, SimpleNamespace(inter=4, padded_inter=None)) is state


SMOL = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            vocab_size=1000, num_hidden_layers=1)


@pytest.mark.parametrize("flags,tp,hidden", [
    (["--int8-weight-only"], 2, 640), (["--int4-weight-only"], 4, 768),
    (["--awq", "--awq-block-size", "64"], 2, 640), (["--int8-weight-only"], 3, None)])
def test_smollm2_shapes_pad_the_hidden_size(tmp_path, tiny_model, capsys, flags, tp, hidden):
    """SmolLM2-135M's hidden size 576 (9 x 64) is a multiple of 64 x tp only for tp 1 and 3: at
    tp 2 / 4 TensorRT-LLM declares the hidden features of qkv, fc, gate (input) and dense, proj
    (output) as 640 / 768, so the checkpoint is laid out with that hidden size
    (tests/test_hidden_padding.py checks the logits); the intermediate 1536 needs nothing."""
    from quantize.formats import QuantSpec

    from convert_helper import preflight_conversion

    hf_dir, _ = tiny_model(**SMOL)
    algo = {"--int8-weight-only": "W8A16", "--int4-weight-only": "W4A16", "--awq": "W4A16_AWQ"}[flags[0]]
    spec = QuantSpec.create(algo, awq_block_size=64 if algo == "W4A16_AWQ" else None)
    _, shape = preflight_conversion(hf_dir, tp=tp, quant=spec, pad_heads=True)
    assert shape.padded_hidden == hidden and shape.padded_inter is None


def test_smollm2_awq128_calibrates_on_the_padded_layout(tiny_model):
    """AWQ group 128 on SmolLM2's shapes at tp 2: the attention output (9 heads x 64) and the
    hidden size (576) are 4.5 groups, so the calibration runs on the model as the checkpoint pads
    it (quantize.calib_padding; tests/test_calib_padding.py checks the logits): heads 12 / 4,
    hidden 640 (whole groups), written at 768 (128 x tp)."""
    from quantize.formats import QuantSpec

    from convert_helper import preflight_conversion

    hf_dir, _ = tiny_model(**SMOL)
    _, shape = preflight_conversion(hf_dir, tp=2, quant=QuantSpec.create("W4A16_AWQ"),
                                    pad_heads=True)
    assert (shape.tp_heads, shape.tp_kv_heads, shape.padded_hidden) == (12, 4, 768)
    assert shape.calib_hidden == 640 and shape.calib_heads
