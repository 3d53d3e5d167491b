"""--target pytorch for the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): the
unified checkpoint equals nvidia-modelopt 0.47's ``export_hf_checkpoint`` of an independent
calibration (transformers 4.57.1 in a subprocess, tests/hf4_export.py ``--unified``: modelopt's
export walks transformers 4's per-expert modules) tensor for tensor, bit for bit, with the same
hf_quant_config.json and config.json ``quantization_config``, for the formats that export writes
for them: FP8 (+ FP8 KV cache), INT8 weight-only, INT4 AWQ (Mixtral), an FP8 KV cache alone
(quantize/unified/experts.py says what it writes). The reference reader runs each checkpoint
within the format's bound of the float model; build_engine calibrates, gates and verifies it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from test_moe import hf4_export, needs_hf4, run_cli
from test_moe_quant import CALIB, _bits, _fresh
from test_qwen3 import trtllm_semantics
from test_qwen_moe_quant import SHAPES

# (family, quant_algo, kv, AWQ group, the reader's bound on the relative logit error: measured
# 0.16 / 0.04 / 0.06 / 0.33 / 0.11 / 0.21 / 0.03 / 0.065; INT4 on this random model: as the engine
# target's 0.34, tests/test_moe_quant.py)
CASES = [("mixtral", "FP8", "fp8", None, 0.3), ("mixtral", "W8A16", None, None, 0.1),
         ("mixtral", None, "fp8", None, 0.15), ("mixtral", "W4A16_AWQ", None, 64, 0.5),
         ("qwen2_moe", "FP8", "fp8", None, 0.3), ("qwen3_moe", "FP8", "fp8", None, 0.3),
         ("qwen2_moe", "W8A16", None, None, 0.1), ("qwen3_moe", "W8A16", None, None, 0.1)]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Tiny random models of each family: {family: (dir, float32 HF model)}, the shapes of
    tests/test_moe_quant.py's and tests/test_qwen_moe_quant.py's."""
    from examples.tiny import make_tiny_model

    out = {}
    for fam, extra in (("mixtral", dict(TINY)),
                       ("qwen2_moe", dict(SHAPES, shared_expert_intermediate_size=512)),
                       ("qwen3_moe", dict(SHAPES, head_dim=32))):
        d = tmp_path_factory.mktemp("hf_" + fam)
        out[fam] = d, make_tiny_model(d, family=fam, **extra).float().eval()
    return out


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, calib_text):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calib_text, encoding="utf-8")
    return p


def _flags(algo, kv, group):
    return (["--quant", algo] if algo else []) + (["--kv", kv] if kv else []) + (
        ["--awq-block-size", str(group)] if group else [])


@needs_hf4
@pytest.mark.parametrize("family,algo,kv,group,bound", [
    pytest.param(*c, marks=[pytest.mark.slow] if i else []) for i, c in enumerate(CASES)],
    ids=["mixtral_fp8_kv_fp8", "mixtral_w8a16", "mixtral_kv_fp8", "mixtral_awq64", "q2_fp8_kv_fp8",
         "q3_fp8_kv_fp8", "q2_w8a16", "q3_w8a16"])
def test_unified_equals_modelopt_export(tmp_path, moe_models, calib_file, family, algo,
                                        kv, group, bound):
    from quantize.unified.checkpoint import write_unified_checkpoint
    from verify.reference import verify

    hf_dir, model = moe_models[family]
    qwen = ["--decoder-type", "qwen"] if family != "mixtral" else []
    root = hf4_export(hf_dir, tmp_path / "modelopt", [1], dtype="float32",
                      extra=_flags(algo, kv, group) + qwen
                      + ["--unified-only", "--calib-text", calib_file])
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, awq_block_size=group, **CALIB)
    calibrated = None
    if spec.needs_calibration:
        calibrated = calibrate(_fresh(hf_dir), spec, calib_file.read_text(encoding="utf-8"),
                               tokenizer=byte_tokenizer, progress=False)
    out = tmp_path / "ours"
    write_unified_checkpoint(hf_dir, out, spec, calibrated_model=calibrated, progress=False)
    ours, theirs = load_file(out / "model.safetensors"), load_file(
        root / "unified" / "model.safetensors")
    assert sorted(ours) == sorted(theirs), set(ours) ^ set(theirs)
    for name, b in theirs.items():
        a = ours[name]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(_bits(a), _bits(b)), f"{name} values differ"
    assert json.loads((out / "hf_quant_config.json").read_text()) == json.loads(
        (root / "unified" / "hf_quant_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == json.loads(
        (root / "unified" / "config.json").read_text())["quantization_config"]
    # the reference reader runs it: quantized (not float), within the format's bound
    ref = trtllm_semantics(model) if family == "qwen3_moe" else model
    ids = torch.tensor([byte_tokenizer(calib_file.read_text(encoding="utf-8")[:200])])
    report, _ = verify(out, ref, input_ids=ids)
    # the case's own bound (measured), not --verify's dtype tolerance: Qwen3-MoE's INT8 weight-only
    # reads 0.065 on this random tiny model, above --verify's 0.058 for fp16 W8A16 (its tensors
    # equal modelopt's export, above)
    assert 1e-3 < report["rel_err"] < bound, (report["rel_err"], report["rel_tolerance"])
    assert report["argmax_agreement"] >= report["min_argmax_agreement"], report


def test_unrouted_expert_gets_the_weights_scale_and_an_unrouted_layer_is_refused(
        moe_models, calib_file):
    """An expert no calibration token reached (simulated: its weight quantizer's amax zeroed, as
    max calibration leaves it) gets its weight's absolute maximum as weight scale and the layer's
    input scale, what modelopt's export gives it (sync_moe_expert_amax); a layer whose experts saw
    no token at all is refused naming it, never written with a zero or NaN scale."""
    from common.errors import UserError
    from model.families import FAMILIES
    from quantize.unified.experts import fp8_expert_tensors

    hf_dir, _ = moe_models["mixtral"]
    spec = QuantSpec.create("FP8", **CALIB)
    model = calibrate(_fresh(hf_dir), spec, calib_file.read_text(encoding="utf-8"),
                      tokenizer=byte_tokenizer, progress=False)
    family = FAMILIES["mixtral"]
    before = fp8_expert_tensors(model, family, torch.float32)
    experts = model.model.layers[1].mlp.experts
    q = experts.gate_up_proj_weight_quantizers[2]
    q._amax = torch.zeros_like(q._amax)
    after = fp8_expert_tensors(model, family, torch.float32)
    src = load_file(hf_dir / "model.safetensors")
    p = "model.layers.1.block_sparse_moe.experts.2"
    absmax = torch.maximum(src[f"{p}.w1.weight"].abs().amax(), src[f"{p}.w3.weight"].abs().amax())
    assert torch.equal(after[f"{p}.w1.weight_scale"], absmax / 448)
    for name, t in before.items():
        assert torch.equal(_bits(after[name]), _bits(t)), name
    experts.down_proj_input_quantizer._amax = torch.zeros_like(
        experts.down_proj_input_quantizer._amax)
    with pytest.raises(UserError, match="layer 1: no calibration token reached its experts"):
        fp8_expert_tensors(model, family, torch.float32)


@pytest.mark.slow
def test_cli_fp8_gated_and_verified(tmp_path, moe_models, tokenizer_dir):
    """The user's command: build_engine --target pytorch --fp8 --kv-cache-dtype fp8 --verify on a
    Mixtral calibrates (the whole model, as the engine target does for MoE: no store), writes the
    unified checkpoint, and its quality gate and --verify pass through the reference reader."""
    src, _ = moe_models["mixtral"]
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    rc, stdout, err = run_cli("--model", hf_dir, "--output", out, "--target", "pytorch", "--fp8",
                              "--kv-cache-dtype", "fp8", "--verify", "--triton-target", "none",
                              "--calib-size", "4", "--calib-seq-len", "64", "--no-progress")
    assert rc == 0, err[-3000:]
    gate = [ln for ln in stdout.splitlines() if ln.startswith("quality gate")]
    assert len(gate) == 1 and "FP8 + FP8 KV cache" in gate[0], stdout
    assert "verify: PASS" in stdout
    hfq = json.loads((out / "hf_quantized" / "hf_quant_config.json").read_text())["quantization"]
    assert hfq["quant_algo"] == "FP8" and "model.layers.1.block_sparse_moe.gate" in \
        hfq["exclude_modules"]
    assert not (out / "hf_quantized.calibration").exists()


@pytest.mark.parametrize("family,flags,expect", [
    ("mixtral", ["--smoothquant"], "--target pytorch with W8A8_SQ_PER_CHANNEL"),
    ("qwen2_moe", ["--awq"], "qwen2_moe with W4A16_AWQ (group 128) on --target pytorch"),
    ("mixtral", ["--fp8", "--moe-ep", "2", "--tp", "2"],
     "the PyTorch backend takes moe_tensor_parallel_size / moe_expert_parallel_size when it "
     "loads the model"),
], ids=["mixtral_smoothquant", "qwen2_moe_awq", "mixtral_moe_ep"])
def test_refused_in_one_line(tmp_path, moe_models, family, flags, expect):
    hf_dir, _ = moe_models[family]
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--target", "pytorch",
                         "--triton-target", "none", *flags)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
