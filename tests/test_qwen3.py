"""Qwen3 dense (model/families/qwen3.py): per-head q/k norms, head_dim != hidden / heads, no biases.

- Float: the reference reader (TensorRT-LLM's semantics) gives HF's logits at tp 1/2/4 and pp 2.
  TensorRT-LLM normalises q and k with its Attention's default eps 1e-5 (model.spec.QK_NORM_EPS),
  not HF's rms_norm_eps (1e-6 here, as in the real Qwen3 models): the reference is the HF model
  with its q/k norms' eps set to 1e-5, and the test shows the eps is what the reader uses.
- Calibrated formats: tensor for tensor nvidia-modelopt 0.47's export_tensorrt_llm_checkpoint
  (decoder_type "qwen"), which exports Qwen3's q_layernorm / k_layernorm; weight-only: the float
  checkpoint's bytes with the quant_algo; --target pytorch: modelopt's export_hf_checkpoint.
- Refusals (one line, exit 2, nothing written): TensorRT-LLM's plugin SmoothQuant, attention_bias,
  sliding-window layers, a tp whose ranks hold as many q as KV heads (> 1).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from builders.cli import main
from common.errors import UserError
from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from verify.reference import ReferenceModel, verify

#: the calibrated formats' tiny shape: head_dim 64 != hidden / heads (32); every per-rank input at
#: tp 2 is 128 (one AWQ group of 128, two of 64), every output a multiple of 64
QTINY = dict(TINY, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)


def trtllm_semantics(model):
    """A copy of the HF model computing what TensorRT-LLM's engine does: q/k norms with eps 1e-5."""
    from model.spec import QK_NORM_EPS

    m = copy.deepcopy(model)
    for layer in m.model.layers:
        layer.self_attn.q_norm.variance_epsilon = QK_NORM_EPS
        layer.self_attn.k_norm.variance_epsilon = QK_NORM_EPS
    return m


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_fp32_logits_equal_hf(tmp_path, tiny_model, tp, pp):
    hf_dir, model = tiny_model("qwen3", num_hidden_layers=3)  # 8 heads, 4 kv, head_dim 16
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, pp=pp, dtype="float32", progress=False)
    rank0 = load_file(tmp_path / "ck" / "rank0.safetensors")
    assert rank0["transformer.layers.0.attention.q_layernorm.weight"].shape == (16,)
    assert rank0["transformer.layers.0.attention.qkv.weight"].shape == ((8 + 2 * 4) * 16 // tp, 64)
    report, passed = verify(tmp_path / "ck", trtllm_semantics(model))
    assert passed and report["rel_err"] < 1e-5 and report["argmax_agreement"] == 1.0, report
    plain, _ = verify(tmp_path / "ck", model)  # HF's own eps 1e-6: measurably not the engine's
    assert plain["rel_err"] > 1e-5, plain


def test_fp16_and_tied_embeddings(tmp_path, tiny_model):
    hf_dir, model = tiny_model("qwen3", tie_word_embeddings=True, vocab_size=999,
                               max_shard_size="200KB")
    convert_checkpoint(hf_dir, tmp_path / "f16", tp=2, dtype="float16", progress=False)
    report, passed = verify(tmp_path / "f16", trtllm_semantics(model))
    assert passed and report["rel_err"] < 4 * 2**-11, report


def test_reader_without_q_k_norms_is_caught(tmp_path, tiny_model):
    """The check can fail: unit q/k norm weights instead of the model's change the logits."""
    from safetensors.torch import save_file

    hf_dir, model = tiny_model("qwen3")
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=1, dtype="float32", progress=False)
    sd = load_file(ck / "rank0.safetensors")
    for name in sd:
        if "q_layernorm" in name or "k_layernorm" in name:
            sd[name] = torch.ones_like(sd[name])
    save_file(sd, ck / "rank0.safetensors")
    report, passed = verify(ck, trtllm_semantics(model))
    assert not passed and report["rel_err"] > 1e-2


def test_config_json_is_what_trtllm_qwen_converter_writes(tmp_path, tiny_model):
    hf_dir, _ = tiny_model("qwen3")
    config = convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False)
    assert config["architecture"] == "Qwen3ForCausalLM"
    assert (config["qwen_type"], config["seq_length"]) == ("qwen3", 8192)
    assert config["head_size"] == 16 and config["hidden_size"] == 64
    assert config["attn_bias"] is False and config["mlp_bias"] is False
    assert config["norm_epsilon"] == 1e-6 and config["rotary_base"] == 10000.0


# --- tensor for tensor: nvidia-modelopt 0.47's TensorRT-LLM export ----------------------------

def modelopt_qwen_export(model, out_dir, tp, dtype=torch.float16):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type="qwen", dtype=dtype, export_dir=out_dir,
                                   inference_tensor_parallel=tp)
    return out_dir


@pytest.mark.parametrize("tp,kv,tied", [(1, 4, False), (2, 4, True), (4, 2, False)])
def test_float_equals_modelopt_export(tmp_path, tiny_model, tp, kv, tied):
    from test_convert_vs_modelopt import assert_same_checkpoint

    hf_dir, model = tiny_model("qwen3", num_key_value_heads=kv, tie_word_embeddings=tied)
    convert_checkpoint(hf_dir, tmp_path / "ours", tp=tp, dtype="float16", progress=False)
    theirs = modelopt_qwen_export(model, tmp_path / "modelopt", tp)
    assert_same_checkpoint(tmp_path / "ours", theirs, tp)


# modelopt's config.json for Qwen3 (its manual path) differs in these keys by design: it writes
# architecture QWenForCausalLM and no qwen_type / seq_length, which TensorRT-LLM's Qwen model needs
QWEN_KEYS = {"architecture", "qwen_type", "seq_length"}


@pytest.mark.parametrize("algo,kv,block,overrides", [
    ("W8A8_SQ_PER_CHANNEL", "int8", None, {}),
    ("FP8", "fp8", None, {}),
    # modelopt's AWQ export wants whole 128-groups of every rank's outputs too
    ("W4A16_AWQ", None, None, {"hidden_size": 256, "intermediate_size": 512}),
    ("W4A16_AWQ", "fp8", 64, {}),
    (None, "int8", None, {}),
], ids=["sq_kv_int8", "fp8_kv_fp8", "awq128", "awq64_kv_fp8", "kv_int8_only"])
def test_calibrated_equals_modelopt_export(tmp_path, calib_text, algo, kv, block, overrides):
    from examples.tiny import make_tiny_model
    from test_quantize_convert import assert_same_checkpoint, lw, spec_for

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, family="qwen3", **dict(QTINY, **overrides)).float().eval()
    spec = spec_for(algo, kv, block)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    ours = tmp_path / "ours"  # tp 2: the split of every tensor (tp 1 is the float tests' case)
    config = convert_checkpoint(hf_dir, ours, tp=2, dtype="float16", progress=False, quant=spec,
                                calibration=lw(tmp_path, calib_text))
    assert config["qwen_type"] == "qwen3"
    rank0 = load_file(ours / "rank0.safetensors")
    assert rank0["transformer.layers.1.attention.k_layernorm.weight"].dtype == torch.float16
    assert_same_checkpoint(ours, modelopt_qwen_export(model, tmp_path / "modelopt", 2),
                           extra_config_keys=QWEN_KEYS)


def test_quantized_checkpoint_verifies(tmp_path, calib_text):
    """An FP8 + FP8 KV checkpoint through the reader's kernels stays close to the model (FP8 on a
    random tiny model: ~12 % relative error; without its q/k norms the logits are unrelated)."""
    from examples.tiny import make_tiny_model
    from test_quantize_convert import lw, spec_for

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, family="qwen3", **QTINY).float().eval()
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False,
                       quant=spec_for("FP8", "fp8"), calibration=lw(tmp_path, calib_text))
    ids = torch.tensor([byte_tokenizer(calib_text[3000:3064])])
    got = ReferenceModel(tmp_path / "ck").forward(ids)
    with torch.no_grad():
        want = trtllm_semantics(model)(ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.2 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.7, rel


@pytest.mark.parametrize("flag,algo", [("--int8-weight-only", "W8A16"),
                                       ("--int4-weight-only", "W4A16")])
def test_weight_only_is_the_float_checkpoint(tmp_path, tiny_model, flag, algo):
    hf_dir, _ = tiny_model("qwen3", **QTINY)
    common = ["--model", str(hf_dir), "--tp", "2", "--checkpoint-only", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "fp16")]) == 0
    assert main([*common, "--output", str(tmp_path / "wo"), flag]) == 0
    cfg = json.loads((tmp_path / "wo" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == algo
    for r in (0, 1):
        name = f"rank{r}.safetensors"
        assert (tmp_path / "wo" / "checkpoint" / name).read_bytes() == \
            (tmp_path / "fp16" / "checkpoint" / name).read_bytes()


# --- --target pytorch: modelopt's export_hf_checkpoint ----------------------------------------

@pytest.mark.parametrize("algo,kv,kw", [
    (None, None, {}),
    ("W8A8_SQ_PER_CHANNEL", None, {}),
    ("FP8", "fp8", {}),
    ("W4A16_AWQ", None, {}),
    (None, "fp8", {}),
], ids=["float", "sq", "fp8_kv_fp8", "awq", "kv_fp8_only"])
def test_unified_checkpoint_equals_modelopt_export(tmp_path, calib_text, algo, kv, kw):
    from examples.tiny import make_tiny_model
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, modelopt_unified, small

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, family="qwen3", **QTINY).float().eval()
    spec = small(algo, kv, **kw)
    if spec.needs_calibration:
        calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibrated_model=model,
                             progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    ours = assert_same_checkpoint(tmp_path / "ours", theirs)
    assert "model.layers.0.self_attn.q_norm.weight" in ours


def test_unified_weight_only_int8_equals_modelopt(tmp_path):
    import modelopt.torch.quantization as mtq

    from examples.tiny import make_tiny_model
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, modelopt_unified, small

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, family="qwen3", **QTINY).float().eval()
    write_unified_checkpoint(hf_dir, tmp_path / "ours", small("W8A16"), progress=False)
    ref = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
    assert_same_checkpoint(tmp_path / "ours", modelopt_unified(ref, tmp_path / "mo", torch.float32))


def test_reader_on_unified_checkpoint_applies_q_k_norms(tmp_path, tiny_model):
    """verify/unified_reader maps q_norm / k_norm by the checkpoint's family spec."""
    from quantize.formats import QuantSpec
    from quantize.unified import write_unified_checkpoint
    from verify.unified_reader import load_unified

    hf_dir, model = tiny_model("qwen3")
    write_unified_checkpoint(hf_dir, tmp_path / "u", QuantSpec.create(None), progress=False)
    _, (tensors,) = load_unified(tmp_path / "u")
    assert "transformer.layers.1.attention.k_layernorm.weight" in tensors
    report, passed = verify(tmp_path / "u", trtllm_semantics(model))
    assert passed and report["rel_err"] < 1e-5, report


# --- refusals -----------------------------------------------------------------------------------

def _run(tmp_path, hf_dir, *flags):
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
               *flags])
    return rc, out


@pytest.mark.parametrize("overrides,flags,needle", [
    ({}, ["--smoothquant"], "--smoothquant (TensorRT-LLM's SmoothQuant plugin) is not supported "
                            "for Qwen3ForCausalLM: TensorRT-LLM 1.2 has no SmoothQuant attention"),
    ({"attention_bias": True}, [], "Qwen3ForCausalLM with attention_bias true in config.json is "
                                   "not supported: TensorRT-LLM 1.2 builds Qwen3 attention without"),
    ({"use_sliding_window": True, "sliding_window": 64}, [],
     "Qwen3ForCausalLM with use_sliding_window true in config.json is not supported"),
    ({"num_key_value_heads": 8}, ["--tp", "2"],
     "cannot split this model over tp 2: 4 attention and 4 KV heads per rank: TensorRT-LLM 1.2's "
     "q/k-norm attention reads that qkv interleaved per head"),
], ids=["sq_plugin", "attention_bias", "sliding_window", "mha_per_rank"])
def test_what_trtllm_cannot_express_is_refused(tmp_path, tiny_model, capsys, overrides, flags,
                                               needle):
    hf_dir, _ = tiny_model("qwen3", **overrides)
    rc, out = _run(tmp_path, hf_dir, *flags)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_mha_valid_tp_values_skip_the_misread_layouts(tiny_model):
    from model.config import read_hf_config
    from model.shape import model_shape, valid_tp_values

    hf_dir, _ = tiny_model("qwen3", num_key_value_heads=8)  # MHA: 1 head per rank reads right
    assert valid_tp_values(model_shape(read_hf_config(hf_dir)), 8) == [8]


def test_reader_refuses_a_layout_it_does_not_model(tmp_path, tiny_model):
    hf_dir, _ = tiny_model("qwen3", num_key_value_heads=8)
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=8, dtype="float32", progress=False)
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mapping"] = {"world_size": 1, "tp_size": 1, "pp_size": 1}  # 8 q and 8 kv heads per rank
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="8 attention and KV heads per rank with q/k norms"):
        ReferenceModel(tmp_path / "ck")


def test_padded_heads_keep_q_k_norms_and_logits(tmp_path, tiny_model):
    """--pad-heads: 6 heads / 2 kv heads over tp 4 pad to 12 / 4 (whole groups of zero heads); the
    q/k norms are per head-dim weights, the same on every rank, and the logits stay HF's."""
    hf_dir, model = tiny_model("qwen3", num_attention_heads=6, num_key_value_heads=2)
    rc, out = _run(tmp_path, hf_dir, "--tp", "4", "--pad-heads", "--dtype", "float32")
    assert rc == 0
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == (12, 4, 16)
    src = load_file(hf_dir / "model.safetensors")["model.layers.0.self_attn.q_norm.weight"]
    for r in range(4):
        t = load_file(out / "checkpoint" / f"rank{r}.safetensors")
        assert torch.equal(t["transformer.layers.0.attention.q_layernorm.weight"], src)
    report, passed = verify(out / "checkpoint", trtllm_semantics(model))
    assert passed and report["rel_err"] < 1e-5, report
