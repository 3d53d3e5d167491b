"""NVFP4 (--nvfp4) on Mixtral, engine target: our checkpoint equals nvidia-modelopt 0.47's
``export_tensorrt_llm_checkpoint`` of an independent transformers-4.57 calibration
(tests/hf4_export.py) bit for bit at tp 1, tp 2 (moe_tp 2), tp 2 (moe_ep 2) and tp 4 (2 x 2), FP8
KV cache included; the reference reader runs the experts' E2M1 weights, E4M3 block scales, per
expert weight globals and the shared activation global (fake quantization of each expert's
input, as TensorRT-LLM's NVFP4 MoE plugin quantizes it) within NVFP4's bound of HF; ``check``
passes the checkpoints against TensorRT-LLM 1.2's MOEWeightWrapper; expert shapes its NVFP4 MoE
layer cannot load are refused before any work; the CLI's quality gate reports the format."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from test_moe import LAYOUTS, run_cli
from test_moe_quant import CALIB, _fresh, needs_hf4, ranks_equal_modelopt


@pytest.fixture(scope="module")
def mixtral_fp4(tmp_path_factory):
    """Tiny random Mixtral (tests/quant_common.TINY: hidden 256, experts 512 wide): every expert
    GEMM a multiple of 128 outputs and 64 inputs per rank at moe_tp 1 and 2."""
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("hf_mixtral_fp4")
    return d, make_tiny_model(d, family="mixtral", **TINY).float().eval()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, calib_text):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calib_text, encoding="utf-8")
    return p


@pytest.mark.slow
@needs_hf4
def test_nvfp4_equals_modelopt_export_at_every_moe_layout(tmp_path, mixtral_fp4, calib_file):
    hf_dir, _ = mixtral_fp4
    spec = QuantSpec.create("NVFP4", kv_cache_dtype="fp8", **CALIB)
    for ours, theirs in ranks_equal_modelopt(hf_dir, tmp_path, calib_file, spec, "NVFP4", "fp8",
                                             LAYOUTS):
        assert sorted(ours.pop("exclude_modules")) == sorted(theirs.pop("exclude_modules"))
        assert ours == theirs == {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8",
                                  "group_size": 16}


def test_reader_near_hf_and_check_passes(tmp_path, mixtral_fp4, calib_text):
    """tp 4 (moe_tp 2 x moe_ep 2): per-expert tensors of the right shapes, the reader within
    NVFP4's bound of the float model (quantized: not float-exact), ``check`` clean."""
    from check import check_dir
    from verify.reference import verify

    hf_dir, model = mixtral_fp4
    spec = QuantSpec.create("NVFP4", **CALIB)
    calibrated = calibrate(_fresh(hf_dir), spec, calib_text, tokenizer=byte_tokenizer,
                           progress=False)
    out = tmp_path / "tp4"
    convert_checkpoint(hf_dir, out, tp=4, moe_tp=2, moe_ep=2, dtype="float16", quant=spec,
                       calibrated_model=calibrated, progress=False)
    rank = load_file(out / "rank3.safetensors")
    p = "transformer.layers.1.mlp."
    assert {k[len(p):]: (tuple(v.shape), v.dtype) for k, v in rank.items()
            if k.startswith(p + "fc.") or k.startswith(p + "proj.")} == {
        "fc.weight": ((2, 512, 128), torch.uint8),
        "fc.weights_scaling_factor": ((2, 512, 16), torch.float8_e4m3fn),
        "fc.weights_scaling_factor_2": ((2,), torch.float32),
        "fc.activation_scaling_factor": ((1,), torch.float32),
        "proj.weight": ((2, 256, 128), torch.uint8),
        "proj.weights_scaling_factor": ((2, 256, 16), torch.float8_e4m3fn),
        "proj.weights_scaling_factor_2": ((2,), torch.float32),
        "proj.activation_scaling_factor": ((1,), torch.float32)}
    ids = torch.tensor([byte_tokenizer(calib_text[:200])])
    report, ok = verify(out, model, input_ids=ids)
    print(f"\nNVFP4 Mixtral tp 4 (2 x 2): reader vs HF rel err {report['rel_err']:.3g}")
    assert ok and 1e-3 < report["rel_err"] < 0.5, report
    _moe_layer_equals_modelopt_fake_quantization(out)
    result = check_dir(out)  # the experts' weight globals: provided, not declared (a warning)
    assert result.exit_code == 0, result.summary()
    assert result.findings and all(
        f.kind == "extra" and not f.fatal and "mlp.fc.weights_global_scaling_factor" in f.message
        for f in result.findings), result.summary()


def test_expert_shape_the_nvfp4_moe_layer_cannot_load_is_refused(tmp_path):
    """Experts 320 wide at moe_tp 2: 160 inputs per rank for proj, 320 outputs for fc — the
    interleaved block scales would need padding TensorRT-LLM 1.2's MOEWeightWrapper does not
    declare: one line, exit 2, nothing written."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family="mixtral", **dict(TINY, intermediate_size=320))
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", "--tp", "2",
                         "--nvfp4")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert ("--nvfp4: experts' mlp.fc has 256 input and 320 output features per rank; "
            "TensorRT-LLM 1.2's NVFP4 MoE layer needs multiples of 64 and 128") in err, err
    assert not out.exists()


@pytest.mark.slow
def test_nvfp4_cli_with_quality_gate(tmp_path, smollm2_dir):
    """The user's command for an NVFP4 Mixtral at tp 2 (moe_ep 2): build_engine calibrates,
    writes, and its quality gate reports NVFP4 and passes a 10 % perplexity limit (SmolLM2's
    tokenizer borrowed so the CLI reads text)."""
    import shutil

    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family="mixtral", dtype=torch.float16,
                    **dict(TINY, vocab_size=49152))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, hf_dir / name)
    out = tmp_path / "out"
    rc, stdout, err = run_cli("--model", hf_dir, "--output", out, "--tp", "2", "--moe-ep", "2",
                              "--checkpoint-only", "--no-progress", "--nvfp4", "--calib-size",
                              "4", "--calib-seq-len", "64", "--max-ppl-increase", "10")
    assert rc == 0, err[-3000:]
    gate = [ln for ln in (stdout + err).splitlines() if ln.startswith("quality gate")]
    assert len(gate) == 1 and "NVFP4" in gate[0] and "PASS" in gate[0], gate
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "NVFP4" and cfg["mapping"]["moe_ep_size"] == 2


def _moe_layer_equals_modelopt_fake_quantization(ckpt):
    """Every rank's MoE partial of layer 0 (the reader, verify/reference_moe.py) summed over the
    ranks equals the same layer computed independently: HF's renormalised top-k routing, and per
    routed expert modelopt's NVFP4QTensor fake quantization of its input and weights from the
    tp-sharded tensors (tests/test_nvfp4.py ``_modelopt_fake_linear``)."""
    import torch.nn.functional as F

    from test_nvfp4 import _modelopt_fake_linear
    from verify.kernel_table import QuantSpec as ReaderSpec
    from verify.kernels import linear
    from verify.reference_moe import MoeSpec, expert_params, moe_partial

    cfg = json.loads((ckpt / "config.json").read_text())
    tp = cfg["mapping"]["tp_size"]
    spec = MoeSpec.from_config(cfg, tp, "test")
    qcfg = ReaderSpec.from_config(cfg)
    torch.manual_seed(0)
    x = torch.randn(1, 7, cfg["hidden_size"])  # float32: no activation rounding to compare
    got = torch.zeros(7, cfg["hidden_size"], dtype=torch.float32)
    want = torch.zeros_like(got)
    p = "transformer.layers.0.mlp."
    for t in range(tp):
        rank = load_file(ckpt / f"rank{t}.safetensors")
        mods = {m: {k[len(p) + len(m) + 1:]: v for k, v in rank.items()
                    if k.startswith(p + m + ".")} for m in ("router", "fc", "proj")}
        got += moe_partial(x, mods, spec, t, linear, qcfg, "layer0").reshape(7, -1).float()
        logits = x.reshape(7, -1).float() @ mods["router"]["weight"].float().t()
        top, ids = torch.topk(torch.softmax(logits, -1), spec.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        experts = spec.local_experts(t)
        for j, e in enumerate(experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                xe = x.reshape(7, -1)[tok].float()
                up, gate = _modelopt_fake_linear(xe, expert_params(mods["fc"], j, len(experts))
                                                 ).chunk(2, dim=-1)
                ye = _modelopt_fake_linear(F.silu(gate) * up,
                                           expert_params(mods["proj"], j, len(experts)))
                want.index_add_(0, tok, ye * top[tok, slot, None])
    rel = float((got - want).norm() / want.norm())
    print(f"NVFP4 MoE layer: reader vs modelopt NVFP4QTensor rel err {rel:.2e}")
    assert rel < 1e-5, rel
