"""Quantized Mixtral: our checkpoint equals nvidia-modelopt 0.47's export of an independent
calibration (transformers 4.57.1 in a subprocess, tests/hf4_export.py; ours calibrates on
transformers 5's fused experts) bit for bit at tp 1, tp 2 (moe_tp 2), tp 2 (moe_ep 2) and tp 4
(2 x 2), for each format modelopt exports for MoE and TensorRT-LLM runs: FP8 (+ FP8 KV cache),
INT8 / INT4 weight-only (float experts + quant_algo; + INT8 KV cache). SmoothQuant and AWQ are
refused for MoE (quantize/moe.py says why). Expert-parallel layouts are checked against
modelopt's export as tests/test_moe.py derives them (TensorRT-LLM's Mapping formulas)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from convert.convert import convert_checkpoint
from convert.errors import UserError
from hf4_export import hf4_dir
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from test_moe import EXPERTS, LAYOUTS, hf4_export, run_cli

needs_hf4 = pytest.mark.skipif(
    hf4_dir() is None, reason="the MoE format reference needs transformers 4.57.1 in "
    ".cache/hf4-transformers-4.57.1 (bash setup.sh installs it)")
CALIB = dict(calib_size=4, calib_seq_len=64, calib_batch_size=2)  # as tests/hf4_export.py


@pytest.fixture(scope="module")
def mixtral_q(tmp_path_factory):
    """Tiny random Mixtral with weight-only- and FP8-friendly shapes (tests/quant_common.TINY)."""
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("hf_mixtral_q")
    model = make_tiny_model(d, family="mixtral", **TINY)
    return d, model.float().eval()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, calib_text):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calib_text, encoding="utf-8")
    return p


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def expected(root, tp, moe_tp, moe_ep, r):
    """modelopt's rank r for (tp, moe_tp, moe_ep): experts from its tp = moe_tp export, rank
    tp_rank // moe_ep, cut to expert block tp_rank % moe_ep (per-expert tensors have E rows)."""
    want = load_file(root / f"tp{tp}" / f"rank{r}.safetensors")
    src = load_file(root / f"tp{moe_tp}" / f"rank{r // moe_ep}.safetensors")
    per = EXPERTS // moe_ep
    lo = (r % moe_ep) * per
    for name in want:
        if ".mlp.fc." in name or ".mlp.proj." in name:
            t = src[name]
            want[name] = t[lo:lo + per] if t.dim() >= 2 and t.shape[0] == EXPERTS else t
    return want


def assert_rank_equal(ours, want, where):
    assert sorted(ours) == sorted(want), (where, set(ours) ^ set(want))
    for name, b in want.items():
        a = ours[name]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), (where, name, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), f"{where}: {name} values differ"


# (our quant_algo, our kv, the modelopt export's quant / kv: weight-only = float export)
FORMATS = [
    ("FP8", "fp8", "FP8", "fp8"),
    ("W8A16", "int8", None, "int8"),
    ("W4A16", None, None, None),
]


@needs_hf4
@pytest.mark.parametrize("algo,kv,mo_algo,mo_kv", FORMATS)
def test_quantized_equals_modelopt_export(tmp_path, mixtral_q, calib_file, algo, kv, mo_algo,
                                          mo_kv):
    hf_dir, _ = mixtral_q
    cmd_q = (["--quant", mo_algo] if mo_algo else []) + (["--kv", mo_kv] if mo_kv else [])
    root = hf4_export(hf_dir, tmp_path / "modelopt", [1, 2, 4],
                      extra=cmd_q + ["--calib-text", str(calib_file)])
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, **CALIB)
    model = None
    if spec.needs_calibration:  # once for every layout, as build_engine calibrates once
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        calibrate(model, spec, calib_file.read_text(encoding="utf-8"), tokenizer=byte_tokenizer,
                  progress=False)
    for tp, moe_tp, moe_ep in LAYOUTS:
        out = tmp_path / f"ours_{tp}_{moe_tp}_{moe_ep}"
        cfg = convert_checkpoint(hf_dir, out, tp=tp, moe_tp=moe_tp, moe_ep=moe_ep,
                                 dtype="float16", quant=spec, calibrated_model=model,
                                 progress=False)
        mt, me = moe_tp or tp, moe_ep or 1
        for r in range(tp):
            assert_rank_equal(load_file(out / f"rank{r}.safetensors"),
                              expected(root, tp, mt, me, r), f"tp {tp} moe {mt}x{me} rank {r}")
        theirs = json.loads((root / f"tp{tp}" / "config.json").read_text())["quantization"]
        ours = dict(cfg["quantization"])
        if mo_algo:  # modelopt lists lm_head and the routers as a set
            assert sorted(ours.pop("exclude_modules")) == sorted(theirs.pop("exclude_modules"))
            assert ours == theirs
        else:  # weight-only: TensorRT-LLM's default exclusions, which hold *router
            assert ours["quant_algo"] == algo and "*router" in ours["exclude_modules"]
            assert ours["kv_cache_quant_algo"] == theirs["kv_cache_quant_algo"]


@needs_hf4
def test_fp8_reader_logits_near_hf(tmp_path, mixtral_q, calib_text):
    """FP8 experts through the reference reader (per-expert weight scales, shared activation
    scale) stay within the FP8 bound of the float HF model at an expert-parallel layout."""
    from verify.reference import verify

    hf_dir, model = mixtral_q
    spec = QuantSpec.create("FP8", **CALIB)
    out = tmp_path / "fp8"
    convert_checkpoint(hf_dir, out, tp=4, moe_tp=2, moe_ep=2, dtype="float16", quant=spec,
                       calibrated_model=calibrate(_fresh(hf_dir), spec, calib_text,
                                                  tokenizer=byte_tokenizer, progress=False),
                       progress=False)
    ids = torch.tensor([byte_tokenizer(calib_text[:200])])
    report, ok = verify(out, model, input_ids=ids)
    assert ok, report
    assert 1e-3 < report["rel_err"] < 0.3, report  # quantized (not float), within FP8's bound


def _fresh(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("algo,flag,expect", [
    ("W8A8_SQ_PER_CHANNEL", "--smoothquant", "--smoothquant is not supported for mixture-of-experts"),
    ("W4A16_AWQ", "--awq", "--awq is not supported for mixture-of-experts"),
])
def test_unsupported_moe_formats_refused(tmp_path, mixtral_q, algo, flag, expect):
    hf_dir, _ = mixtral_q
    with pytest.raises(UserError, match=expect):
        convert_checkpoint(hf_dir, tmp_path / "x", quant=QuantSpec.create(algo, **CALIB))
    assert not (tmp_path / "x").exists()
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", flag)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_weight_only_expert_shapes_refused(tmp_path):
    """An expert GEMM TensorRT-LLM's weight-only kernels cannot take: refused before any work."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family="mixtral", **dict(TINY, intermediate_size=160))
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only",
                         "--int8-weight-only")
    assert rc == 2 and "experts' mlp.proj has 160 input features per rank" in err, err
    assert not out.exists()


def test_every_expert_gets_a_weight_scale_and_an_unrouted_layer_is_refused(mixtral_q, calib_text):
    """An expert that saw no calibration token (simulated: its weight quantizer's amax removed,
    as max calibration leaves it when no token reaches the expert) still gets its weight's
    absolute max as scale, the same value calibration gives; a layer whose experts saw no token
    at all (no activation amax) is refused naming it, never written with a zero or NaN scale."""
    from quantize.moe import extract_moe_state

    hf_dir, _ = mixtral_q
    spec = QuantSpec.create("FP8", **CALIB)
    model = calibrate(_fresh(hf_dir), spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    before = extract_moe_state(model, spec)
    experts = model.model.layers[1].mlp.experts
    q = experts.gate_up_proj_weight_quantizers[2]
    q._amax = torch.zeros_like(q._amax)  # what an uncalibrated amax looks like: zero
    after = extract_moe_state(model, spec)
    for name, t in before.items():
        assert torch.equal(_bits(after[name]), _bits(t)), name
        if "scaling_factor" in name:
            assert torch.isfinite(t).all() and (t > 0).all(), name
    experts.down_proj_input_quantizer._amax = torch.zeros_like(
        experts.down_proj_input_quantizer._amax)
    with pytest.raises(UserError, match="layer 1: no calibration token reached its experts"):
        extract_moe_state(model, spec)
