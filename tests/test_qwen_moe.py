"""Qwen2-MoE and Qwen3-MoE (model/families/qwen_moe.py): experts as Mixtral's, Qwen2-MoE's gated
shared expert, Qwen3-MoE's q/k norms and normalised top-k routing.

- Float: the reference reader (TensorRT-LLM's semantics, verify/reference_moe.py) gives HF's
  logits at tp 1/2/4, pp 2, moe_tp 2, moe_ep 2 and 2 x 2 (fp32 within 1e-5; Qwen3-MoE against
  the HF model with TensorRT-LLM's q/k-norm eps, as tests/test_qwen3.py), and the checkpoint
  equals nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint(decoder_type="qwen")`` tensor
  for tensor (on transformers 4.57.1, tests/hf4_export.py, as for Mixtral: modelopt walks the
  per-expert modules transformers 5 fuses); --target pytorch equals its ``export_hf_checkpoint``.
- Routing: ``norm_topk_prob`` is written as ``moe.normalization_mode`` RENORMALIZE (1), and the
  reader shows that NONE (0, what TensorRT-LLM's own converter writes) does not give HF's logits.
- check/ passes the checkpoints and catches a shared-expert gate TensorRT-LLM would not load.
- Refusals (one line, exit 2, nothing written): layers without experts, sliding windows,
  Qwen2-MoE without q/k/v bias, a shared expert tp does not divide (the unproven formats:
  tests/test_qwen_moe_quant.py).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_helper import convert_checkpoint
from test_moe import assert_equal_tensors, hf4_export, needs_hf4, run_cli
from test_qwen3 import trtllm_semantics
from verify.reference import verify

FAMILIES = ("qwen2_moe", "qwen3_moe")
EXPERTS = 4
# tp, pp, moe_tp, moe_ep (None: TensorRT-LLM's defaults moe_tp = tp, moe_ep = 1)
LAYOUTS = [(1, 1, None, None), (2, 1, None, None), (4, 1, None, None), (1, 2, None, None),
           (2, 1, 2, 1), (2, 1, 1, 2), (4, 1, 2, 2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (hf dir, fp32 HF model, the model as TensorRT-LLM computes it): 4 experts of
    width 32, top 2, 3 layers; Qwen2-MoE's shared expert 48 wide; Qwen3-MoE norm_topk_prob."""
    from examples.tiny import make_tiny_model

    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        model = make_tiny_model(d, family=fam, num_hidden_layers=3).float().eval()
        out[fam] = d, model, trtllm_semantics(model) if fam == "qwen3_moe" else model
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp,moe_tp,moe_ep", LAYOUTS)
def test_fp32_logits_equal_hf(tmp_path, models, family, tp, pp, moe_tp, moe_ep):
    hf_dir, _, ref = models[family]
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=tp, pp=pp, moe_tp=moe_tp, moe_ep=moe_ep, dtype="float32",
                       progress=False)
    mt, me = moe_tp or tp, moe_ep or 1
    rank0 = load_file(ck / "rank0.safetensors")
    assert rank0["transformer.layers.0.mlp.fc.weight"].shape == (EXPERTS // me, 2 * 32 // mt, 64)
    assert rank0["transformer.layers.0.mlp.router.weight"].dtype == torch.float32
    if family == "qwen2_moe":
        assert rank0["transformer.layers.0.mlp.shared_expert.fc.weight"].shape == (2 * 48 // tp, 64)
        assert rank0["transformer.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    report, passed = verify(ck, ref)
    assert passed and report["rel_err"] < 1e-5 and report["argmax_agreement"] == 1.0, report


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_within_its_tolerance(tmp_path, models, family):
    hf_dir, _, ref = models[family]
    convert_checkpoint(hf_dir, tmp_path / "f16", tp=2, moe_ep=2, moe_tp=1, dtype="float16",
                       progress=False)
    report, passed = verify(tmp_path / "f16", ref)
    assert passed and report["rel_err"] < 16 * 2.0 ** -11, report


@pytest.mark.parametrize("family,mode", [("qwen2_moe", 0), ("qwen3_moe", 1)])
def test_config_json_as_trtllm_qwen_converter(tmp_path, models, family, mode):
    """QWenConfig.from_hugging_face's keys (qwen_type, the MoE widths, HF's dense
    intermediate_size, swiglu), the moe block with the routing that equals HF's."""
    hf_dir, _, _ = models[family]
    c = convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, moe_tp=1, moe_ep=2, dtype="float16",
                           progress=False)
    assert (c["architecture"], c["qwen_type"], c["hidden_act"]) == (
        {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family], family,
        "swiglu")
    assert (c["intermediate_size"], c["moe_intermediate_size"],
            c["moe_shared_expert_intermediate_size"]) == (160, 32, 48 if mode == 0 else 0)
    assert c["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": mode}
    assert c["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 1,
                            "moe_ep_size": 2}
    assert c["attn_bias"] is (family == "qwen2_moe") and c["seq_length"] == 8192


@pytest.mark.parametrize("family,norm_topk_prob", [("qwen3_moe", True), ("qwen2_moe", True)])
def test_routing_renormalises_only_where_hf_does(tmp_path, tiny_model, family, norm_topk_prob):
    """norm_topk_prob: RENORMALIZE (1) gives HF's logits; NONE (0), what TensorRT-LLM's Qwen
    converter writes for every Qwen MoE type, measurably does not."""
    hf_dir, model = tiny_model(family, norm_topk_prob=norm_topk_prob)
    ref = trtllm_semantics(model) if family == "qwen3_moe" else model
    ck = tmp_path / "ck"
    c = convert_checkpoint(hf_dir, ck, tp=2, dtype="float32", progress=False)
    assert c["moe"]["normalization_mode"] == 1
    report, passed = verify(ck, ref)
    assert passed and report["rel_err"] < 1e-5, report
    c["moe"]["normalization_mode"] = 0
    (ck / "config.json").write_text(json.dumps(c))
    report, passed = verify(ck, ref)
    assert not passed and report["rel_err"] > 1e-3, report


def test_reader_catches_an_ungated_shared_expert(tmp_path, models):
    """The check can fail: a zero shared_expert_gate (sigmoid 0.5 instead of the model's gate)."""
    hf_dir, _, ref = models["qwen2_moe"]
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=1, dtype="float32", progress=False)
    t = load_file(ck / "rank0.safetensors")
    for name in [n for n in t if n.endswith("shared_expert_gate.weight")]:
        t[name] = torch.zeros_like(t[name])
    save_file(t, ck / "rank0.safetensors")
    report, passed = verify(ck, ref)
    assert not passed and report["rel_err"] > 1e-3, report


@pytest.mark.parametrize("family", FAMILIES)
def test_check_passes_and_catches_a_flat_shared_gate(tmp_path, models, family):
    from check import check_dir

    hf_dir, _, _ = models[family]
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=2, pp=1, moe_tp=1, moe_ep=2, dtype="float16",
                       progress=False)
    result = check_dir(ck)
    assert result.exit_code == 0 and result.tensors > 0 and not result.findings, result.summary()
    if family == "qwen3_moe":
        return
    t = load_file(ck / "rank1.safetensors")
    name = "transformer.layers.0.mlp.shared_expert_gate.weight"
    t[name] = t[name].reshape(-1).contiguous()  # [hidden]: RowLinear(hidden, 1) declares [1, hidden]
    save_file(t, ck / "rank1.safetensors")
    result = check_dir(ck)
    assert result.exit_code != 0, result.summary()
    assert any("shared_expert_gate" in str(f) for f in result.problems), result.summary()


@pytest.fixture(scope="module")
def modelopt(models, tmp_path_factory):
    """modelopt 0.47's exports of both tiny models (transformers 4.57.1): TRT-LLM at tp 1/2/4
    (float16) and the unified HF checkpoint (float32)."""
    out = {}
    for fam in FAMILIES:
        hf_dir, _, _ = models[fam]
        root = tmp_path_factory.mktemp("modelopt_" + fam) / "export"
        ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        out[fam] = hf4_export(hf_dir, root, [1, 2, 4], ids=ids,
                              extra=["--unified", "--decoder-type", "qwen"]), ids
    return out


@pytest.mark.slow  # modelopt's exports on transformers 4.57.1: two subprocesses, ~2 min
@needs_hf4
@pytest.mark.parametrize("family", FAMILIES)
def test_both_transformers_read_the_same_weights(models, modelopt, family):
    _, model, _ = models[family]
    root, ids = modelopt[family]
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, torch.load(root / "logits.pt"), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # modelopt's exports on transformers 4.57.1: two subprocesses, ~2 min
@needs_hf4
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_float_equals_modelopt_export(tmp_path, models, modelopt, family, tp):
    """Every tensor, name, shape and dtype as modelopt's TRT-LLM export (whose manual config.json
    lacks qwen_type and the moe block TensorRT-LLM's QWen model reads: ours follows the
    converter, test_config_json_as_trtllm_qwen_converter)."""
    hf_dir, _, _ = models[family]
    root, _ = modelopt[family]
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, dtype="float16", progress=False)
    for r in range(tp):
        assert_equal_tensors(load_file(tmp_path / "ck" / f"rank{r}.safetensors"),
                             load_file(root / f"tp{tp}" / f"rank{r}.safetensors"), f"rank {r}")


@pytest.mark.slow  # modelopt's exports on transformers 4.57.1: two subprocesses, ~2 min
@needs_hf4
@pytest.mark.parametrize("family", FAMILIES)
def test_target_pytorch_equals_modelopt_unified_export(tmp_path, models, modelopt, family):
    hf_dir, _, _ = models[family]
    root, _ = modelopt[family]
    out = tmp_path / "out"
    rc, stdout, err = run_cli("--model", hf_dir, "--output", out, "--target", "pytorch",
                              "--triton-target", "none", "--verify", "--no-progress")
    assert rc == 0, err
    assert "verify: PASS" in stdout
    assert_equal_tensors(load_file(out / "hf_quantized" / "model.safetensors"),
                         load_file(root / "unified" / "model.safetensors"), "unified")


@pytest.mark.parametrize("family,overrides,flags,expect", [
    ("qwen2_moe", {"mlp_only_layers": [1]}, [],
     "Qwen2MoeForCausalLM with mlp_only_layers [1] in config.json is not supported: TensorRT-LLM "
     "1.2's QWenDecoderLayer builds experts in every layer"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, [],
     "Qwen3MoeForCausalLM with decoder_sparse_step 2 in config.json is not supported"),
    ("qwen2_moe", {"qkv_bias": False}, [],
     "Qwen2MoeForCausalLM with qkv_bias false in config.json is not supported"),
    ("qwen3_moe", {"attention_bias": True}, [],
     "Qwen3MoeForCausalLM with attention_bias true in config.json is not supported"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, [],
     "with use_sliding_window true in config.json is not supported"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 50}, ["--tp", "4"],
     "shared expert intermediate size 50 is not divisible by tp 4"),
])
def test_refused_before_any_work(tmp_path, family, overrides, flags, expect):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family=family, num_hidden_layers=2, **overrides)
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", "--no-progress",
                         *flags)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_engine: error: "), err
    assert expect in lines[0], lines[0]
    assert not out.exists()
