"""DeepSeek-V2 / V2-Lite (multi-head latent attention, routed + shared experts): the engine
checkpoint against transformers 5's DeepseekV2ForCausalLM, TensorRT-LLM's converter formulas
restated independently, and ``build_engine check``.

Two tiny models (examples/tiny.py): V2-Lite's layout (no q-LoRA, greedy routing, mscale =
mscale_all_dim) and V2's (q-LoRA, group-limited routing with a scaling factor, mscale !=
mscale_all_dim). Each: 1 dense + 2 MoE layers of 8 routed + 2 shared experts, yarn RoPE.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import verify.mla as mla
from builders.cli import main
from convert.convert import convert_checkpoint
from examples.tiny import DEEPSEEK_V2_QLORA
from verify.model import ReferenceModel

VARIANTS = {"lite": {}, "qlora": DEEPSEEK_V2_QLORA}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (hf_dir, fp32 HF model)."""
    from examples.tiny import make_tiny_model

    out = {}
    for name, overrides in VARIANTS.items():
        d = tmp_path_factory.mktemp(f"deepseek_{name}")
        out[name] = (d, make_tiny_model(d, family="deepseek_v2", **overrides).float().eval())
    return out


IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _max_rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("variant", ["lite", "qlora"])
@pytest.mark.parametrize("layout", [dict(tp=1), dict(tp=2), dict(pp=2), dict(tp=2, moe_tp=2),
                                    dict(tp=2, moe_ep=2)],
                         ids=["tp1", "tp2", "pp2", "moe_tp2", "moe_ep2"])
def test_fp32_logits_equal_hf_on_both_mla_paths(tmp_path, models, variant, layout):
    hf_dir, model = models[variant]
    convert_checkpoint(hf_dir, tmp_path / "ck", dtype="float32", progress=False, **layout)
    want = _hf_logits(model)
    ref = ReferenceModel(tmp_path / "ck", lazy=True)
    for path in ("absorbed", "context"):  # generation kernels (fused_q_proj) and context phase
        ref.mla = replace(ref.mla, path=path)
        assert _max_rel(ref(IDS), want) < 1e-5, path


def test_rotary_needs_no_permutation_and_the_test_sees_one(tmp_path, models, monkeypatch):
    """HF DeepSeek rotates adjacent pairs of q_pe / k_pe, as TensorRT-LLM's MLA kernels do
    (GPT-J style): the rows are written unpermuted. Rotating halves instead (GPT-NeoX) is caught."""
    hf_dir, model = models["lite"]
    convert_checkpoint(hf_dir, tmp_path / "ck", dtype="float32", progress=False)
    want = _hf_logits(model)
    assert _max_rel(ReferenceModel(tmp_path / "ck")(IDS), want) < 1e-5

    def neox(x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    monkeypatch.setattr(mla, "rotate_pairs", neox)
    assert _max_rel(ReferenceModel(tmp_path / "ck")(IDS), want) > 1e-3


def _absorbed_einsum(q_w, kv_b_w, heads, nope, rope, v):
    """TensorRT-LLM's converter formula (deepseek_v2/convert.py), in float32 with torch."""
    q = q_w.float().unflatten(0, (heads, nope + rope))
    kv = kv_b_w.float().unflatten(0, (heads, nope + v))
    q_nope, q_pe = q.split([nope, rope], dim=1)
    k_nope = kv[:, :nope]
    fused = torch.einsum("hdq,hdk->hkq", q_nope, k_nope)
    return torch.cat([fused, q_pe], dim=1).flatten(0, 1)


@pytest.mark.parametrize("variant", ["lite", "qlora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_q_proj_is_the_fp32_einsum_then_cast(tmp_path, models, variant, dtype):
    hf_dir, model = models[variant]
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype=dtype, progress=False)
    c = model.config
    heads, nope, rope, v = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    for layer in range(c.num_hidden_layers):
        attn = model.model.layers[layer].self_attn
        q_w = (attn.q_b_proj if c.q_lora_rank else attn.q_proj).weight.detach()
        want = _absorbed_einsum(q_w, attn.kv_b_proj.weight.detach(), heads, nope, rope, v)
        per = want.shape[0] // 2
        for t in range(2):
            got = load_file(tmp_path / "ck" / f"rank{t}.safetensors")[
                f"transformer.layers.{layer}.attention.fused_q_proj"]
            assert got.dtype == getattr(torch, dtype)
            part = want[t * per:(t + 1) * per]
            if dtype == "float32":
                torch.testing.assert_close(got, part, rtol=1e-6, atol=1e-7)
            else:  # the float32 result rounded once (a float32 sum order may tip a rare tie)
                same = got == part.to(torch.bfloat16)
                assert same.float().mean() > 0.99
                tol = part.abs()[~same] * 2 ** -7 + 1e-6 * part.abs().max()  # cancellation
                assert ((got.float() - part).abs()[~same] <= tol).all()


def test_kv_b_proj_and_q_b_proj_are_split_by_heads(tmp_path, models):
    hf_dir, model = models["qlora"]
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float32", progress=False)
    c, attn = model.config, model.model.layers[1].self_attn
    nope, v, hr = c.qk_nope_head_dim, c.v_head_dim, c.num_attention_heads // 2
    kv = attn.kv_b_proj.weight.detach().unflatten(0, (c.num_attention_heads, nope + v))
    fused_a = torch.cat([attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight]).detach()
    for t in range(2):
        r = load_file(tmp_path / "ck" / f"rank{t}.safetensors")
        mine = kv[t * hr:(t + 1) * hr]
        want = torch.cat([mine[:, :nope].flatten(0, 1), mine[:, nope:].flatten(0, 1)])
        assert torch.equal(r["transformer.layers.1.attention.kv_b_proj"], want)
        rows = attn.q_b_proj.weight.shape[0] // 2
        assert torch.equal(r["transformer.layers.1.attention.q_b_proj"],
                           attn.q_b_proj.weight.detach()[t * rows:(t + 1) * rows])
        assert torch.equal(r["transformer.layers.1.attention.fused_a.weight"], fused_a)
        assert r["transformer.layers.1.mlp.router.weight"].dtype == torch.float32


def _dequantized(model, bits: int):
    """A copy of the HF model with every linear trtllm-build quantizes (o_proj, the dense MLP, the
    routed and shared experts; not fused_a's sources, which the converter keeps float, nor the
    MLA Parameters, the router, embedding or lm_head) replaced by its per-output-channel
    symmetric quantization: scale = max|w| / 2^(bits-1), round half away from zero, clamp to the
    signed range."""
    m = copy.deepcopy(model)
    top = 2 ** (bits - 1)

    def fake(w):
        scale = w.abs().amax(dim=-1, keepdim=True) / top
        q = torch.sign(w / scale) * torch.floor((w / scale).abs() + 0.5)
        return q.clamp(-top, top - 1) * scale

    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            a.o_proj.weight.copy_(fake(a.o_proj.weight))
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.gate_up_proj.copy_(fake(mlp.experts.gate_up_proj))
                mlp.experts.down_proj.copy_(fake(mlp.experts.down_proj))
                mlp = mlp.shared_experts
            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                lin.weight.copy_(fake(lin.weight))
    return m


@pytest.mark.parametrize("variant", ["lite", "qlora"])
@pytest.mark.parametrize("flag,algo,bits", [("--int8-weight-only", "W8A16", 8),
                                            ("--int4-weight-only", "W4A16", 4)])
def test_weight_only_reader_equals_independent_dequantization(tmp_path, models, variant, flag,
                                                              algo, bits):
    hf_dir, model = models[variant]
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                 "--no-progress", "--dtype", "float32", flag]) == 0
    ck = out / "checkpoint"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == algo
    assert "*fused_a" in cfg["quantization"]["exclude_modules"]
    got = ReferenceModel(ck)(IDS)
    want = _hf_logits(_dequantized(model, bits))
    assert _max_rel(got, want) < 1e-5
    assert _max_rel(got, _hf_logits(model)) > 1e-4  # the quantization is there to be seen


def test_config_json_is_what_trtllm_deepseek_v2_config_writes(tmp_path, models):
    hf_dir, _ = models["qlora"]
    cfg = convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, moe_ep=2, progress=False)
    assert cfg["architecture"] == "DeepseekV2ForCausalLM"
    assert (cfg["num_key_value_heads"], cfg["head_size"]) == (1, 48 + 16)
    assert cfg["rotary_scaling"] == {"beta_fast": 32, "beta_slow": 1, "factor": 4.0, "mscale": 1.0,
                                     "mscale_all_dim": 0.8,
                                     "original_max_position_embeddings": 64, "type": "yarn"}
    assert cfg["moe"] == {"num_experts": 8, "shared_expert_intermediate_size": 128, "top_k": 2,
                          "normalization_mode": 3, "device_limited_n_group": 4,
                          "device_limited_topk_group": 1,
                          "device_limited_routed_scaling_factor": 2.0}
    assert (cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_nope_head_dim"],
            cfg["qk_rope_head_dim"], cfg["v_head_dim"]) == (64, 48, 32, 16, 32)
    # what transformers 5's DeepseekV2Config lacks and TensorRT-LLM reads
    assert (cfg["moe_layer_freq"], cfg["coring_func"], cfg["first_k_dense_replace"]) == \
        (1, "softmax", 1)
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 1,
                              "moe_ep_size": 2}
    assert (cfg["hidden_act"], cfg["moe_inter_size"], cfg["intermediate_size"]) == \
        ("swiglu", 64, 128)


@pytest.mark.parametrize("variant,layout,flags", [
    ("lite", ["--tp", "2", "--moe-ep", "2"], []),
    ("qlora", ["--pp", "2"], []),
    ("qlora", [], ["--int8-weight-only"]),
    ("lite", [], ["--int4-weight-only"]),
])
def test_build_engine_check_passes(tmp_path, models, capsys, variant, layout, flags):
    hf_dir, _ = models[variant]
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                 "--no-progress", *layout, *flags]) == 0
    capsys.readouterr()
    assert main(["check", str(out / "checkpoint")]) == 0
    assert "check: PASS" in capsys.readouterr().out
    assert main(["check", str(out / "checkpoint"), "--gpu", "a100"]) == 1  # MLA: Hopper
    fail = capsys.readouterr()
    assert "need TensorRT-LLM's MLA kernels: Hopper (SM 90)" in fail.out + fail.err


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,flags,needle", [
    (dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"), [],
     "DeepseekV3ForCausalLM (DeepSeek-V3 / R1) has no TensorRT engine in TensorRT-LLM 1.2"),
    (dict(first_k_dense_replace=2), [],
     "DeepseekV2ForCausalLM with first_k_dense_replace 2 and moe_layer_freq 1 is not supported"),
    (dict(topk_method="noaux_tc"), [],
     "DeepseekV2ForCausalLM with topk_method 'noaux_tc' is not supported by TensorRT-LLM 1.2's "
     "engine flow"),
    ({}, ["--tp", "3"], "cannot split this model over tp 3: 4 attention heads are not divisible"),
    ({}, ["--fp8"], "deepseek_v2 with FP8 on --target engine is not supported yet; supported: "
                    "float, W8A16, W4A16"),
    ({}, ["--target", "pytorch"], "deepseek_v2 cannot be written for --target pytorch yet"),
    # the routed experts' GEMMs are moe_intermediate_size wide (64 / moe_tp 2), not the dense 128
    (dict(hidden_size=128), ["--tp", "2", "--int8-weight-only"],
     "W8A16: experts' mlp.proj has 32 input features per rank, not a multiple of 64"),
], ids=["v3", "first_dense", "noaux_tc", "tp3", "fp8", "pytorch", "expert_gemm"])
def test_refusals_are_one_line_before_any_work(tmp_path, models, capsys, changes, flags, needle):
    hf_dir = _edit_config(models["lite"][0], tmp_path / "hf", **changes)
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
               "--no-progress", *flags])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_fused_q_proj_is_computed_one_head_at_a_time(tmp_path, models):
    """The computed tensor streams: one chunk per head, never the whole stack in float32."""
    from convert.compute import computed_chunks
    from convert.plan import rank_plan
    from convert.source import SourceCheckpoint
    from model.source import ModelSource

    hf_dir, model = models["lite"]
    src = ModelSource.open(hf_dir)
    plan = rank_plan(src.shape, SourceCheckpoint(hf_dir), tp=1, pp=1, rank=0, dtype="float32")
    t = next(t for t in plan if t.name.endswith("layers.2.attention.fused_q_proj"))
    chunks = list(computed_chunks(SourceCheckpoint(hf_dir), t))
    assert len(chunks) == model.config.num_attention_heads
    assert {len(c.data) for c in chunks} == {(48 + 16) * 64 * 4}


@pytest.mark.parametrize("variant", ["lite", "qlora"])
def test_disk_plan_counts_the_spec_tensors(tmp_path, models, variant):
    """The memory plan's disk figure for the checkpoint is at least what is written, and close."""
    from model.source import ModelSource
    from quantize.memory import FIXED_DISK, spec_bytes

    hf_dir, _ = models[variant]
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False)
    real = sum(p.stat().st_size for p in (tmp_path / "ck").glob("rank*.safetensors"))
    planned = spec_bytes(ModelSource.open(hf_dir).shape, 2, 2) + FIXED_DISK
    assert real <= planned < real * 1.2
