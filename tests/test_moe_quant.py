"""Quantized Mixtral: our checkpoint equals nvidia-modelopt 0.47's export of an independent
calibration (transformers 4.57.1 in a subprocess, tests/hf4_export.py; ours calibrates on
transformers 5's fused experts; for AWQ, unfused into transformers 4's per-expert linears) bit for
bit at tp 1, tp 2 (moe_tp 2), tp 2 (moe_ep 2) and tp 4 (2 x 2), for each format modelopt exports
for MoE and TensorRT-LLM runs: FP8 (+ FP8 KV cache), INT4-AWQ (group 128 + INT8 KV cache, group 64
+ FP8 KV cache), INT8 / INT4 weight-only (float experts + quant_algo; + INT8 KV cache).
SmoothQuant is refused for MoE (quantize/moe.py says why). Expert-parallel layouts are checked against
modelopt's export as tests/test_moe.py derives them (TensorRT-LLM's Mapping formulas)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from convert_helper import convert_checkpoint
from common.errors import UserError
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
    tp_rank // moe_ep, cut to expert block tp_rank % moe_ep (per-expert tensors have E rows;
    NVFP4's per-expert weight globals are [E]; an activation scale is one [1] per module)."""
    want = load_file(root / f"tp{tp}" / f"rank{r}.safetensors")
    src = load_file(root / f"tp{moe_tp}" / f"rank{r // moe_ep}.safetensors")
    per = EXPERTS // moe_ep
    lo = (r % moe_ep) * per
    for name in want:
        if ".mlp.fc." in name or ".mlp.proj." in name:
            t = src[name]
            per_expert = t.dim() >= 1 and t.shape[0] == EXPERTS and \
                not name.endswith("activation_scaling_factor")
            want[name] = t[lo:lo + per] if per_expert else t
    return want


def assert_rank_equal(ours, want, where):
    assert sorted(ours) == sorted(want), (where, set(ours) ^ set(want))
    for name, b in want.items():
        a = ours[name]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), (where, name, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), f"{where}: {name} values differ"


# (our quant_algo, our kv, AWQ group, the modelopt export's quant / kv: weight-only = float
# export, layouts). AWQ 128 stops at tp 2: at tp 4 attention.dense has 64 inputs per rank, fewer
# than a group (refused by our preflight, and modelopt's export fails on it).
FORMATS = [
    ("FP8", "fp8", None, "FP8", "fp8", LAYOUTS),
    ("W8A16", "int8", None, None, "int8", LAYOUTS),
    ("W4A16", None, None, None, None, LAYOUTS),
    ("W4A16_AWQ", "int8", 128, "W4A16_AWQ", "int8", LAYOUTS[:3]),
    ("W4A16_AWQ", "fp8", 64, "W4A16_AWQ", "fp8", LAYOUTS),
]


@needs_hf4
@pytest.mark.parametrize("algo,kv,group,mo_algo,mo_kv,layouts", FORMATS,
                         ids=["fp8_kv_fp8", "w8a16_kv_int8", "w4a16", "awq128_kv_int8",
                              "awq64_kv_fp8"])
def test_quantized_equals_modelopt_export(tmp_path, mixtral_q, calib_file, algo, kv, group,
                                          mo_algo, mo_kv, layouts):
    """AWQ: ours calibrates transformers 5's experts unfused into transformers 4's per-expert
    linears (quantize/moe_blocks.py), modelopt's reference a real transformers-4.57 model."""
    hf_dir, _ = mixtral_q
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, awq_block_size=group, **CALIB)
    extra = ["--awq-block-size", str(group)] if group else []
    for ours, theirs in ranks_equal_modelopt(hf_dir, tmp_path, calib_file, spec, mo_algo, mo_kv,
                                             layouts, extra):
        if mo_algo:  # modelopt lists lm_head and the routers as a set
            assert sorted(ours.pop("exclude_modules")) == sorted(theirs.pop("exclude_modules"))
            assert ours == theirs
        else:  # weight-only: TensorRT-LLM's default exclusions, which hold *router
            assert ours["quant_algo"] == algo and "*router" in ours["exclude_modules"]
            assert ours["kv_cache_quant_algo"] == theirs["kv_cache_quant_algo"]


@pytest.mark.parametrize("algo,group,bound", [("FP8", None, 0.3), ("W4A16_AWQ", 64, 0.5)])
def test_reader_logits_near_hf(tmp_path, mixtral_q, calib_text, algo, group, bound):
    """Quantized experts through the reference reader (FP8: per-expert weight scales, shared
    activation scale; AWQ: per-expert int4 groups and pre-quant scales) stay within the format's
    bound of the float HF model at an expert-parallel layout (tp 4 = moe_tp 2 x moe_ep 2); INT4 on
    this random 2-layer model: 0.34 relative (round-to-nearest W4A16: 0.39-0.40)."""
    from verify.reference import verify

    hf_dir, model = mixtral_q
    spec = QuantSpec.create(algo, awq_block_size=group, **CALIB)
    out = tmp_path / algo
    calibrated = calibrate(_fresh(hf_dir), spec, calib_text, tokenizer=byte_tokenizer,
                           progress=False)
    convert_checkpoint(hf_dir, out, tp=4, moe_tp=2, moe_ep=2, dtype="float16", quant=spec,
                       calibrated_model=calibrated, progress=False)
    ids = torch.tensor([byte_tokenizer(calib_text[:200])])
    report, ok = verify(out, model, input_ids=ids)
    assert ok, report
    assert 1e-3 < report["rel_err"] < bound, report  # quantized (not float), within the bound
    if algo == "W4A16_AWQ":  # the reader runs exactly the int4 weights the checkpoint holds
        for name, tp, moe_tp, moe_ep in (("tp1", 1, None, None), ("tp4", 4, 2, 2)):
            convert_checkpoint(hf_dir, tmp_path / name, tp=tp, moe_tp=moe_tp, moe_ep=moe_ep,
                               dtype="float32", quant=spec, calibrated_model=calibrated,
                               progress=False)  # float32: no activation rounding to compare
        exact, _ = verify(tmp_path / "tp4", dequantized_awq_model(hf_dir, tmp_path / "tp1"),
                          input_ids=ids)
        assert exact["rel_err"] < 1e-5, exact  # measured 6.3e-7


def _unpack_int4(packed, scale, group):
    """An independent reading of modelopt's int4 packing: two signed int4 a byte along the output
    dim (low nibble = even row), times the per-group scale."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0x0F, b >> 4
    q = torch.stack([lo, hi], dim=-2).flatten(-3, -2)  # rows 2k, 2k+1
    q = torch.where(q > 7, q - 16, q).float()
    return q * scale.float().repeat_interleave(group, dim=-1)


def dequantized_awq_model(hf_dir, ckpt):
    """The float32 HF Mixtral with every AWQ linear of the tp-1 checkpoint ``ckpt`` put back as the
    float weight it computes with (an independent reading of the format): dequantized int4 times the pre-quant scale on its inputs
    (y = (x * s) W^T = x (W * s)^T); experts' mlp.fc = [w3; w1] -> gate_up_proj = [w1; w3]."""
    cfg = json.loads((ckpt / "config.json").read_text())
    group = cfg["quantization"]["group_size"]
    t = load_file(ckpt / "rank0.safetensors")
    model = _fresh(hf_dir)

    def weight(p):
        w = _unpack_int4(t[f"{p}.weight"], t[f"{p}.weights_scaling_factor"], group)
        return w * t[f"{p}.prequant_scaling_factor"].float().unsqueeze(-2)

    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            p = f"transformer.layers.{i}"
            q, k, v = weight(f"{p}.attention.qkv").split([heads * hd, kv * hd, kv * hd])
            attn = layer.self_attn
            for lin, w in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                           (attn.o_proj, weight(f"{p}.attention.dense"))):
                lin.weight.copy_(w)
            up, gate = weight(f"{p}.mlp.fc").chunk(2, dim=1)
            layer.mlp.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
            layer.mlp.experts.down_proj.copy_(weight(f"{p}.mlp.proj"))
    return model


def ranks_equal_modelopt(hf_dir, tmp_path, calib_file, spec, mo_algo, mo_kv, layouts, extra=()):
    """Our checkpoint at each (tp, moe_tp, moe_ep) of ``layouts`` (calibrated once, as
    build_engine calibrates once) equals modelopt's export (quant ``mo_algo``, kv ``mo_kv``, its
    ``extra`` flags) rank for rank, bit for bit; returns each layout's (ours, theirs) config.json
    quantization block for the caller's checks."""
    cmd_q = (["--quant", mo_algo] if mo_algo else []) + (["--kv", mo_kv] if mo_kv else [])
    root = hf4_export(hf_dir, tmp_path / "modelopt", sorted({tp for tp, _, _ in layouts}),
                      extra=cmd_q + list(extra) + ["--calib-text", str(calib_file)])
    model = None
    if spec.needs_calibration:
        model = calibrate(_fresh(hf_dir), spec, calib_file.read_text(encoding="utf-8"),
                          tokenizer=byte_tokenizer, progress=False)
    blocks = []
    for tp, moe_tp, moe_ep in layouts:
        out = tmp_path / f"ours_{tp}_{moe_tp}_{moe_ep}"
        cfg = convert_checkpoint(hf_dir, out, tp=tp, moe_tp=moe_tp, moe_ep=moe_ep,
                                 dtype="float16", quant=spec, calibrated_model=model,
                                 progress=False)
        mt, me = moe_tp or tp, moe_ep or 1
        for r in range(tp):
            assert_rank_equal(load_file(out / f"rank{r}.safetensors"),
                              expected(root, tp, mt, me, r), f"tp {tp} moe {mt}x{me} rank {r}")
        theirs = json.loads((root / f"tp{tp}" / "config.json").read_text())["quantization"]
        blocks.append((dict(cfg["quantization"]), theirs))
    return blocks


def _fresh(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("algo,flag,expect", [
    ("W8A8_SQ_PER_CHANNEL", "--smoothquant", "--smoothquant is not supported for mixture-of-experts"),
    ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "--smoothquant",
     "--smoothquant is not supported for mixture-of-experts"),
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


@pytest.mark.parametrize("inter,flags,expect", [
    (160, ["--int8-weight-only"], "experts' mlp.proj has 160 input features per rank"),
    (384, ["--tp", "2", "--awq"], "--awq: experts' mlp.proj input size per rank 192 is not a "
                                  "multiple of the AWQ group size 128; choose a --moe-tp"),
])
def test_expert_shapes_refused(tmp_path, inter, flags, expect):
    """An expert GEMM TensorRT-LLM's weight-only kernels cannot take, or AWQ groups that do not
    tile a rank's expert input: refused before any work."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family="mixtral", **dict(TINY, intermediate_size=inter))
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", *flags)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
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


def test_awq_expert_without_a_calibration_token_is_refused_naming_it(mixtral_q, calib_text):
    """AWQ cannot calibrate an expert that no calibration token reached (modelopt would give it a
    pre-quant scale of ones and average that into the layer's): refused naming the layer and the
    experts. One calibration token, top 2 of 4 experts: two experts of layer 0 see nothing; which
    ones is read independently from the float model's router."""
    from quantize.moe import extract_moe_state

    hf_dir, model = mixtral_q
    spec = QuantSpec.create("W4A16_AWQ", awq_block_size=64, calib_size=1, calib_seq_len=1,
                            calib_batch_size=1)
    token = byte_tokenizer(calib_text)[:1]
    routed = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(
        lambda mod, inp, out: routed.extend(out[2].flatten().tolist()))
    with torch.no_grad():
        model(input_ids=torch.tensor([token]))
    hook.remove()
    unrouted = ", ".join(str(e) for e in range(EXPERTS) if e not in routed)
    calibrated = calibrate(_fresh(hf_dir), spec, calib_text, tokenizer=byte_tokenizer,
                           progress=False)
    with pytest.raises(UserError, match=f"--awq: layer 0: experts {unrouted} saw no calibration "
                                        f"token"):
        extract_moe_state(calibrated, spec)


def test_awq_cli_with_quality_gate(tmp_path, smollm2_dir):
    """The user's command for an AWQ Mixtral at tp 2 (moe_ep 2): build_engine calibrates, writes,
    and its quality gate (reference reader vs the float model on held-back text) passes a 10 %
    perplexity limit. The tiny random model borrows SmolLM2's tokenizer so the CLI reads text."""
    import shutil

    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family="mixtral", dtype=torch.float16,
                    **dict(TINY, vocab_size=49152))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, hf_dir / name)
    out = tmp_path / "out"
    rc, stdout, err = run_cli("--model", hf_dir, "--output", out, "--tp", "2", "--moe-ep", "2",
                              "--checkpoint-only", "--no-progress", "--awq", "--awq-block-size",
                              "64", "--calib-size", "4", "--calib-seq-len", "64",
                              "--max-ppl-increase", "10")
    assert rc == 0, err[-3000:]
    gate = [ln for ln in (stdout + err).splitlines() if ln.startswith("quality gate")]
    assert len(gate) == 1 and "W4A16_AWQ (group 64)" in gate[0] and "PASS" in gate[0], gate
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert cfg["mapping"]["moe_ep_size"] == 2
    ranks = [load_file(out / "checkpoint" / f"rank{r}.safetensors") for r in range(2)]
    for r in ranks:  # each rank: its 2 experts, int4 packed, positive finite scales
        assert r["transformer.layers.0.mlp.fc.weight"].shape == (2, 512, 256)
        for name, t in r.items():
            if "scaling_factor" in name:
                assert torch.isfinite(t.float()).all() and (t.float() > 0).all(), name
