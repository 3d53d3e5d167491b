"""The hidden size padded exactly for TensorRT-LLM's weight-only / AWQ linears (issue 28;
quantize.apply.pad_features, model.spec.RESCALED_DIMS, convert.shard.pad_hidden,
quantize.feature_padding): TensorRT-LLM 1.x's WeightOnlyQuantLinear (64 x tp) and
WeightOnlyGroupwiseQuantLinear (max(64, group) x tp) declare every linear's full features rounded
up, so a hidden size that is not a multiple is padded everywhere in the engine checkpoint: zero
embedding / lm_head / linear features, config.json ``hidden_size`` H', ``norm_epsilon`` x H / H'
and every hidden-size RMSNorm weight x sqrt(H / H'). The reader runs the padded ranks as
TensorRT-LLM runs them and must give the unpadded tp-1 checkpoint's logits in float32.

The tiny models: hidden 576 (SmolLM2's; 9 x 64) with 8 heads of 64 (head_dim explicit) and
intermediate 1024, so W8A16 / W4A16 / AWQ-64 pad 576 -> 640 at tp 2 and -> 768 at tp 4; AWQ-128
needs whole groups in the unpadded model it calibrates, so it uses hidden 384 (3 x 128) -> 512
at tp 2 and tp 4.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders.cli import main
from check.report import check_dir
from convert_helper import convert_checkpoint
from quant_common import calibrated_if_needed, assert_same_rank_files, byte_tokenizer, same_row_max_on_every_rank
from verify.reference import ReferenceModel

TINY = dict(intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            vocab_size=1000, num_hidden_layers=1, rms_norm_eps=1e-6)
# (algo, AWQ block, hidden, tp -> padded hidden)
CASES = {"w8a16": ("W8A16", None, 576, {2: 640, 4: 768}),
         "w4a16": ("W4A16", None, 576, {2: 640, 4: 768}),
         "awq64": ("W4A16_AWQ", 64, 576, {2: 640, 4: 768}),
         "awq128": ("W4A16_AWQ", 128, 384, {2: 512, 4: 512})}


def _tiny(tmp_path_factory, hidden):
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp(f"hf{hidden}")
    # columns in every tp 1 / 2 / 4 slice of o_proj's 512 and down_proj's 1024 inputs
    model = make_tiny_model(d, hidden_size=hidden, **TINY).float().eval()
    model = same_row_max_on_every_rank(model, (0, 130, 260, 390), (0, 260, 520, 780))
    model.save_pretrained(d)
    return d, model


def _spec(algo, block=None):
    from quantize.formats import QuantSpec

    return QuantSpec.create(algo, awq_block_size=block, calib_size=4, calib_seq_len=64,
                            calib_batch_size=2)


def _logits(ck, ids):
    return ReferenceModel(ck).forward(ids)[..., :1000]


@pytest.mark.parametrize("case", list(CASES))
def test_padded_hidden_gives_the_unpadded_tp1_logits(tmp_path, tmp_path_factory, calib_text, case):
    """tp 2 / 4 checkpoints with the hidden size padded pass ``check`` and their logits equal the
    unpadded tp-1 checkpoint's (fp32, 1e-5); config.json and the tensors carry the padding."""
    algo, block, hidden, padded = CASES[case]
    hf_dir, model = _tiny(tmp_path_factory, hidden)
    spec = _spec(algo, block)
    calibrated = calibrated_if_needed(model, spec, calib_text)
    kw = dict(dtype="float32", progress=False, quant=spec, calibrated_model=calibrated)
    base_cfg = convert_checkpoint(hf_dir, tmp_path / "tp1", tp=1, **kw)
    assert base_cfg["hidden_size"] == hidden and base_cfg["norm_epsilon"] == 1e-6
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5032]), byte_tokenizer(calib_text[9000:9032])])
    base = _logits(tmp_path / "tp1", ids)
    for tp, h in padded.items():
        ck = tmp_path / f"tp{tp}"
        cfg = convert_checkpoint(hf_dir, ck, tp=tp, **kw)
        assert cfg["hidden_size"] == h and cfg["head_size"] == 64
        assert cfg["norm_epsilon"] == pytest.approx(1e-6 * hidden / h, rel=1e-12)
        result = check_dir(ck)
        assert result.exit_code == 0, result.summary()
        _check_padded_tensors(ck, tp, hidden, h, model)
        rel = float((_logits(ck, ids) - base).norm() / base.norm())
        assert rel < 1e-5, (tp, rel)


def _check_padded_tensors(ck, tp, hidden, padded, model):
    """Zero embedding / lm_head columns and dense / proj output rows beyond ``hidden``; norms
    rescaled by sqrt(H / H') with zero padded entries."""
    scale = math.sqrt(hidden / padded)
    ln_f = model.model.norm.weight.detach()
    for r in range(tp):
        t = load_file(ck / f"rank{r}.safetensors")
        for name in ("transformer.vocab_embedding.weight", "lm_head.weight",
                     "transformer.layers.0.attention.qkv.weight"):
            if t[name].dtype == torch.float32:  # float: hidden on dim 1 (AWQ packs rows)
                assert t[name].shape[1] == padded and t[name][:, hidden:].abs().sum() == 0, name
        for name in ("transformer.layers.0.attention.dense.weight",
                     "transformer.layers.0.mlp.proj.weight"):
            rows = t[name].shape[0]
            real = rows * hidden // padded  # AWQ: two int4 per byte along the rows
            assert t[name][real:].abs().sum() == 0 and t[name][:real].abs().sum() > 0, name
        for name in ("transformer.ln_f.weight", "transformer.layers.0.input_layernorm.weight",
                     "transformer.layers.0.post_layernorm.weight"):
            assert t[name].shape == (padded,) and t[name][hidden:].abs().sum() == 0, name
        torch.testing.assert_close(t["transformer.ln_f.weight"][:hidden], ln_f * scale)


def test_hidden_padding_that_is_not_exact_is_caught(tmp_path, tmp_path_factory):
    """The logit check can fail: the norm weights written unscaled, or padded embedding columns
    made non-zero, change the tp-2 logits."""
    hf_dir, _ = _tiny(tmp_path_factory, 576)
    spec = _spec("W8A16")
    convert_checkpoint(hf_dir, tmp_path / "tp1", tp=1, dtype="float32", progress=False, quant=spec)
    ids = torch.tensor([list(range(32))])
    base = _logits(tmp_path / "tp1", ids)
    for breakage in ("unscaled norms", "embedding"):
        ck = tmp_path / breakage.replace(" ", "_")
        convert_checkpoint(hf_dir, ck, tp=2, dtype="float32", progress=False, quant=spec)
        for r in range(2):
            f = ck / f"rank{r}.safetensors"
            sd = load_file(f)
            if breakage == "embedding":
                sd["transformer.vocab_embedding.weight"][:, 576:] = 0.5
            else:
                for name in [n for n in sd if n.endswith("layernorm.weight") or "ln_f" in n]:
                    sd[name] = sd[name] / math.sqrt(576 / 640)
            save_file(sd, f)
        rel = float((_logits(ck, ids) - base).norm() / base.norm())
        assert rel > 1e-4, (breakage, rel)


@pytest.mark.parametrize("family,why", [
    ("mixtral", "the hidden size cannot be padded: TensorRT-LLM's MoE experts (layers/moe.py) are "
                "not padded"),
    ("gemma3", "the hidden size cannot be padded: TensorRT-LLM's Gemma scales the embedding by "
               "sqrt(hidden_size)"),
])
def test_families_that_cannot_pad_hidden_are_refused(tmp_path, tiny_model, capsys, family, why):
    """A family whose hidden size padding would not be exact (Mixtral's unpadded experts, Gemma's
    sqrt(hidden_size) embedding scale) is refused before any work, exit 2, naming why."""
    hf_dir, _ = tiny_model(family, hidden_size=192, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, intermediate_size=256)
    out = tmp_path / "o"
    capsys.readouterr()
    rc = main(["--model", str(hf_dir), "--tp", "2", "--int8-weight-only", "--checkpoint-only",
               "--no-progress", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("build_engine: error: W8A16: TensorRT-LLM's WeightOnlyQuantLinear pads "
                          "a linear's input and output features to a multiple of 64 x tp = 128"), err
    assert f"attention.qkv's 192 input features would not meet the model's ({why}" in err
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags,tp,padded", [
    (["--int8-weight-only"], 4, 768), (["--int4-weight-only"], 2, 640),
])
def test_issue_command_on_smollm2_writes_a_checkpoint_check_passes(tmp_path, capsys, flags, tp,
                                                                   padded):
    """The issue's command on the bundled ``llama`` (the real SmolLM2-135M: hidden 576, 9 heads
    padded to 12 by --pad-heads): the hidden size is padded, said in one line and in build.json,
    and ``check`` passes the checkpoint (exit 3: no TensorRT-LLM here to build the engines).
    The weight-only formats, which need no calibration (AWQ's calibration of the 30 layers takes
    minutes on 2 cores; its tensors are covered by the tiny-model cases above)."""
    import json

    from builders.check_cli import main as check_main

    out = tmp_path / "o"
    rc = main(["--model", "llama", "--tp", str(tp), *flags, "--no-progress", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc in (0, 3), captured.err
    assert f"hidden: padded 576 -> {padded} (exact" in captured.out
    ck = out / "checkpoint"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["hidden_size"] == padded and cfg["num_attention_heads"] == 12
    layout = json.loads((out / "build.json").read_text())["layout"]
    assert layout["hidden_padding"]["hidden_size"] == [576, padded]
    assert check_main([str(ck)]) == 0
    assert "check: PASS" in capsys.readouterr().out


def _hand_padded_hf(model, out, padded):
    """An independent restatement in HF terms: the same model with hidden size ``padded``, zero
    embedding / lm_head columns, zero q/k/v/gate/up input columns, zero o/down output rows,
    rms_norm_eps x H / H' and the norm weights x sqrt(H / H') (in float32, zeros after)."""
    from transformers import AutoModelForCausalLM

    hidden = model.config.hidden_size
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size, cfg.rms_norm_eps = padded, model.config.rms_norm_eps * hidden / padded
    big = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = big.state_dict()
    for name, t in model.state_dict().items():
        z = torch.zeros_like(sd[name])
        z[tuple(slice(0, n) for n in t.shape)] = t * math.sqrt(hidden / padded) \
            if name.endswith("norm.weight") else t
        sd[name] = z
    big.load_state_dict(sd)
    big.save_pretrained(out)
    return out


@pytest.mark.parametrize("algo", ["W8A16", "W4A16"])
def test_padded_checkpoint_equals_a_hand_padded_model(tmp_path, tmp_path_factory, algo):
    """The tp-2 checkpoint with the hidden size padded is, tensor for tensor and in config.json,
    the ordinary tp-2 conversion of the model padded by hand in HF terms (so its engines are)."""
    hf_dir, model = _tiny(tmp_path_factory, 576)
    hand = _hand_padded_hf(model, tmp_path / "hand", 640)
    a = convert_checkpoint(hf_dir, tmp_path / "a", tp=2, dtype="float32", progress=False,
                           quant=_spec(algo))
    b = convert_checkpoint(hand, tmp_path / "b", tp=2, dtype="float32", progress=False,
                           quant=_spec(algo))
    assert a == b
    assert_same_rank_files(tmp_path / "a", tmp_path / "b", 2)
