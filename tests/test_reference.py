"""The CPU reference reader (verify/reference.py) against Hugging Face logits.

Checkpoints come from two writers, never from this project's converter:
* nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint`` (the format reference). It always writes
  fp16/bf16 (a float32 request is turned into float16 with a warning), so these tests check
  fp16/bf16 rounding tolerances;
* ``handwritten_checkpoint`` below: a HAND-WRITTEN FIXTURE that lays out HF weights following
  docs/trtllm-format.md. It exists for what modelopt cannot export: float32 (the
  < 1e-5 check) and uneven pipeline splits (modelopt asserts num_layers % pp == 0). It is itself
  checked tensor-for-tensor against modelopt's export where modelopt can write the same thing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from verify.reference import (LINEAR_KERNELS, ReferenceModel, compare_with_hf, load_checkpoint, main,
                               register_linear, verify)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


# ------------------------------------------------------------------------------------------------
# Checkpoint writers
# ------------------------------------------------------------------------------------------------

def modelopt_export(model, out_dir, tp=1, pp=1, dtype=torch.float16, decoder_type="llama",
                    keep_rope_scaling=True):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    # transformers >= 5 quirks: modelopt reads config.__dict__, where rope_theta and rope_scaling no
    # longer live (they moved into rope_parameters). Without these lines it writes rotary_base 10000
    # and no rotary_scaling at all.
    model.config.rope_theta = model.config.rope_parameters["rope_theta"]
    if keep_rope_scaling and model.config.rope_parameters.get("rope_type", "default") != "default":
        model.config.__dict__["rope_scaling"] = dict(model.config.rope_parameters)
    export_tensorrt_llm_checkpoint(model, decoder_type=decoder_type, dtype=dtype, export_dir=out_dir,
                                   inference_tensor_parallel=tp, inference_pipeline_parallel=pp)
    return out_dir


def handwritten_checkpoint(model, out_dir, tp=1, pp=1, dtype=torch.float32):
    """HAND-WRITTEN FIXTURE: a TensorRT-LLM checkpoint laid out from the HF state dict per the notes.

    Per tp rank: its q heads then its kv heads (a copy of the one its q heads use when kv < tp) in
    attention.qkv; fc = gate_proj, gate = up_proj split on rows; dense / proj split on columns;
    embedding and lm_head padded with zero rows to a multiple of tp, split on rows; norms
    replicated. Per pp rank: torch.tensor_split of the layers (first ranks get the extra one),
    numbered from 0; embedding on the first, ln_f and lm_head on the last.
    """
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    H, nh, kv, L, V = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers, c.vocab_size
    hd = getattr(c, "head_dim", None) or H // nh
    qn = nh // tp
    Vp = -(-V // tp) * tp

    def pad(w):
        return torch.cat([w, w.new_zeros(Vp - V, w.shape[1])]) if Vp > V else w

    def kv_idx(t):
        return list(range(t * kv // tp, (t + 1) * kv // tp)) if kv >= tp else [t * kv // tp]

    def rows(w, t, n):
        return w[t * n:(t + 1) * n]

    emb = pad(sd["model.embed_tokens.weight"])
    head = pad(sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for p, layers in enumerate(torch.tensor_split(torch.arange(L), pp)):
        for t in range(tp):
            w = {}
            if p == 0:
                w["transformer.vocab_embedding.weight"] = rows(emb, t, Vp // tp)
            for i, li in enumerate(layers.tolist()):
                s, d = f"model.layers.{li}", f"transformer.layers.{i}"
                for part in ("weight", "bias"):
                    if f"{s}.self_attn.q_proj.{part}" not in sd:
                        continue
                    q = sd[f"{s}.self_attn.q_proj.{part}"].reshape(nh, hd, -1)[t * qn:(t + 1) * qn]
                    k = sd[f"{s}.self_attn.k_proj.{part}"].reshape(kv, hd, -1)[kv_idx(t)]
                    v = sd[f"{s}.self_attn.v_proj.{part}"].reshape(kv, hd, -1)[kv_idx(t)]
                    qkv = torch.cat([q, k, v]).reshape(-1, H) if part == "weight" else torch.cat([q, k, v]).reshape(-1)
                    w[f"{d}.attention.qkv.{part}"] = qkv
                o = sd[f"{s}.self_attn.o_proj.weight"]
                w[f"{d}.attention.dense.weight"] = o[:, t * qn * hd:(t + 1) * qn * hd]
                inter = c.intermediate_size // tp
                w[f"{d}.mlp.fc.weight"] = rows(sd[f"{s}.mlp.gate_proj.weight"], t, inter)
                w[f"{d}.mlp.gate.weight"] = rows(sd[f"{s}.mlp.up_proj.weight"], t, inter)
                w[f"{d}.mlp.proj.weight"] = sd[f"{s}.mlp.down_proj.weight"][:, t * inter:(t + 1) * inter]
                w[f"{d}.input_layernorm.weight"] = sd[f"{s}.input_layernorm.weight"]
                w[f"{d}.post_layernorm.weight"] = sd[f"{s}.post_attention_layernorm.weight"]
            if p == pp - 1:
                w["transformer.ln_f.weight"] = sd["model.norm.weight"]
                w["lm_head.weight"] = rows(head, t, Vp // tp)
            save_file({k: x.to(dtype).contiguous() for k, x in w.items()}, str(out_dir / f"rank{p * tp + t}.safetensors"))
    rope = dict(c.rope_parameters)
    config = {
        "architecture": c.architectures[0] if c.architectures else type(model).__name__,
        "dtype": str(dtype).split(".")[1], "logits_dtype": str(dtype).split(".")[1],
        "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": kv,
        "hidden_size": H, "head_size": hd, "intermediate_size": c.intermediate_size, "vocab_size": V,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
        "norm_epsilon": c.rms_norm_eps, "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope["rope_theta"], "rotary_pct": 1.0,
        "use_parallel_embedding": True, "embedding_sharding_dim": 0, "share_embedding_table": False,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if rope.get("rope_type", "default") != "default":
        config["rotary_scaling"] = rope   # TensorRT-LLM's converter copies HF's rope_scaling dict as is
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def edit_copy(src, dst, edit_tensors=None, edit_config=None):
    """Copy a checkpoint; edit_tensors(rank, dict) and edit_config(dict) change it in place."""
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        for f in sorted(dst.glob("rank*.safetensors")):
            t = load_file(f)
            edit_tensors(int(f.stem[4:]), t)
            save_file({k: v.contiguous() for k, v in t.items()}, str(f))
    return dst


def report(r):
    return f"rel {r['rel_err']:.2e} max_abs {r['max_abs_err']:.2e} argmax {r['argmax_agreement']:.3f}"


# ------------------------------------------------------------------------------------------------
# The hand-written fixture is the format modelopt writes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,tp,pp,kv,vocab,layers,tied,rope", [
    ("llama", 2, 1, 4, 1000, 2, False, None),
    ("llama", 4, 1, 2, 1001, 2, False, None),          # kv < tp, vocab padding
    ("llama", 2, 2, 4, 999, 4, True, None),            # pp (local layer numbering), tied, padding
    ("llama", 1, 1, 4, 1000, 2, False, LLAMA3_ROPE),   # rotary_scaling keys
    ("qwen2", 2, 1, 2, 1000, 2, False, None),          # qkv bias
])
def test_handwritten_fixture_equals_modelopt_export(tmp_path, tiny_model, family, tp, pp, kv, vocab,
                                                    layers, tied, rope):
    extra = {"rope_parameters": rope} if rope else {}
    _, model = tiny_model(family, num_key_value_heads=kv, vocab_size=vocab, num_hidden_layers=layers,
                          tie_word_embeddings=tied, **extra)
    ours = handwritten_checkpoint(model, tmp_path / "ours", tp, pp, torch.float16)
    theirs = modelopt_export(model, tmp_path / "modelopt", tp, pp, decoder_type="qwen" if family == "qwen2" else "llama")
    for r in range(tp * pp):
        a, b = load_file(ours / f"rank{r}.safetensors"), load_file(theirs / f"rank{r}.safetensors")
        assert sorted(a) == sorted(b), (r, set(a) ^ set(b))
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (r, k)
            assert torch.equal(a[k], b[k]), (r, k)
    ca, cb = json.loads((ours / "config.json").read_text()), json.loads((theirs / "config.json").read_text())
    for key in ("dtype", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                "head_size", "intermediate_size", "vocab_size", "norm_epsilon", "position_embedding_type",
                "rotary_base", "use_parallel_embedding", "embedding_sharding_dim", "mapping", "rotary_scaling"):
        assert ca.get(key) == cb.get(key), key


# ------------------------------------------------------------------------------------------------
# float32: the reference equals HF to float32 round-off
# ------------------------------------------------------------------------------------------------

FP32_CASES = {
    "mha_tp1": dict(family="llama", tp=1, pp=1, kv=8),
    "gqa_tp2": dict(family="llama", tp=2, pp=1, kv=4),
    "gqa_tp4": dict(family="llama", tp=4, pp=1, kv=4),
    "kv2_tp4_vocab1001": dict(family="llama", tp=4, pp=1, kv=2, vocab=1001),
    "pp2_uneven": dict(family="llama", tp=1, pp=2, kv=4, layers=3),
    "tp2_pp2_uneven": dict(family="llama", tp=2, pp=2, kv=2, layers=3),
    "llama31_rope_tp2": dict(family="llama", tp=2, pp=1, kv=4, rope=LLAMA3_ROPE),
    "linear_rope": dict(family="llama", tp=1, pp=1, kv=4, rope=LINEAR_ROPE),
    "qwen2_bias_tp2": dict(family="qwen2", tp=2, pp=1, kv=2),
    "tied_tp2_vocab999": dict(family="llama", tp=2, pp=1, kv=4, vocab=999, tied=True),
    "mistral_tp2": dict(family="mistral", tp=2, pp=1, kv=2),
}


def _make(tiny_model, family, kv, vocab=1000, layers=2, tied=False, rope=None, **_):
    extra = {"rope_parameters": rope} if rope else {}
    return tiny_model(family, num_key_value_heads=kv, vocab_size=vocab, num_hidden_layers=layers,
                      tie_word_embeddings=tied, **extra)


@pytest.mark.parametrize("case", list(FP32_CASES))
def test_fp32_checkpoint_matches_hf(tmp_path, tiny_model, case):
    spec = FP32_CASES[case]
    hf_dir, model = _make(tiny_model, **spec)
    ckpt = handwritten_checkpoint(model, tmp_path / "ckpt", spec["tp"], spec["pp"], torch.float32)
    r, ok = verify(ckpt, hf_dir)
    print(case, report(r))
    assert ok, report(r)
    assert r["rel_err"] < 1e-5 and r["argmax_agreement"] == 1.0, report(r)
    assert r["tp"] == spec["tp"] and r["pp"] == spec["pp"]


def test_forward_shape_and_hf_model_object(tmp_path, tiny_model):
    hf_dir, model = tiny_model("llama", vocab_size=1001)
    ckpt = handwritten_checkpoint(model, tmp_path / "ckpt", tp=4)  # lm_head padded to 1004 rows
    ref = ReferenceModel(ckpt)
    ids = torch.tensor([[1, 2, 3, 1000], [5, 6, 7, 8]])
    logits = ref.forward(ids)
    assert logits.shape == (2, 4, 1001) and logits.dtype == torch.float32
    r = compare_with_hf(ckpt, model, input_ids=ids)   # a loaded HF model works as well as a dir
    assert r["rel_err"] < 1e-5 and r["shape"] == [2, 4, 1001]
    # batch rows are independent; a prefix gives the same logits (causal)
    assert torch.allclose(ref.forward(ids[:1, :2]), logits[:1, :2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# modelopt's fp16 / bf16 export: within the storage dtype's rounding
# ------------------------------------------------------------------------------------------------

MODELOPT_CASES = {
    "mha_tp1": dict(family="llama", tp=1, pp=1, kv=8),
    "gqa_tp2": dict(family="llama", tp=2, pp=1, kv=4),
    "gqa_tp4": dict(family="llama", tp=4, pp=1, kv=4),
    "kv2_tp4_vocab1001": dict(family="llama", tp=4, pp=1, kv=2, vocab=1001),
    "pp2": dict(family="llama", tp=1, pp=2, kv=4, layers=4),
    "tp2_pp2": dict(family="llama", tp=2, pp=2, kv=2, layers=4),
    "llama31_rope_tp2": dict(family="llama", tp=2, pp=1, kv=4, rope=LLAMA3_ROPE),
    "qwen2_bias_tp2": dict(family="qwen2", tp=2, pp=1, kv=2),
    "tied_tp2_vocab999": dict(family="llama", tp=2, pp=1, kv=4, vocab=999, tied=True),
    "bf16_gqa_tp2": dict(family="llama", tp=2, pp=1, kv=4, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(MODELOPT_CASES))
def test_modelopt_export_matches_hf(tmp_path, tiny_model, case):
    spec = MODELOPT_CASES[case]
    hf_dir, model = _make(tiny_model, **spec)
    dtype = spec.get("dtype", torch.float16)
    ckpt = modelopt_export(model, tmp_path / "ckpt", spec["tp"], spec["pp"], dtype=dtype,
                           decoder_type="qwen" if spec["family"] == "qwen2" else "llama")
    r, ok = verify(ckpt, hf_dir)
    print(case, report(r))
    assert ok, report(r)
    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    assert r["rel_err"] < 8 * u, report(r)          # measured 1-2u
    assert r["argmax_agreement"] >= 0.95, report(r)


# ------------------------------------------------------------------------------------------------
# The comparison can fail
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fp16_tp2(tmp_path, tiny_model):
    hf_dir, model = tiny_model("llama", num_key_value_heads=4)
    return hf_dir, modelopt_export(model, tmp_path / "good", tp=2)


def _swap_fc_gate(rank, t):
    for k in [k for k in t if k.endswith("mlp.fc.weight")]:
        g = k.replace("mlp.fc.", "mlp.gate.")
        t[k], t[g] = t[g], t[k]


def _permute_q_heads(rank, t):
    if rank == 0:
        w = t["transformer.layers.0.attention.qkv.weight"]
        hd = 8
        w[:hd], w[hd:2 * hd] = w[hd:2 * hd].clone(), w[:hd].clone()   # swap q heads 0 and 1


def _perturb_replica(rank, t):
    if rank == 1:   # only tp rank 1's copy of a replicated tensor differs
        t["transformer.ln_f.weight"] = t["transformer.ln_f.weight"] * 1.5


@pytest.mark.parametrize("edit", [_swap_fc_gate, _permute_q_heads, _perturb_replica])
def test_corrupted_checkpoint_is_a_mismatch(tmp_path, fp16_tp2, edit):
    hf_dir, good = fp16_tp2
    assert verify(good, hf_dir)[1]
    bad = edit_copy(good, tmp_path / "bad", edit_tensors=edit)
    r, ok = verify(bad, hf_dir)
    print(edit.__name__, report(r))
    assert not ok and r["rel_err"] > 0.02, report(r)


def test_missing_rotary_scaling_is_a_mismatch(tmp_path, tiny_model):
    """Rope scaling is really applied: dropping it from config.json breaks the match (fp32)."""
    hf_dir, model = _make(tiny_model, "llama", kv=4, rope=LLAMA3_ROPE)
    good = handwritten_checkpoint(model, tmp_path / "good")
    assert verify(good, hf_dir)[0]["rel_err"] < 1e-5
    bad = edit_copy(good, tmp_path / "bad", edit_config=lambda c: c.pop("rotary_scaling"))
    r, ok = verify(bad, hf_dir)
    assert not ok and r["rel_err"] > 1e-3, report(r)


def test_modelopt_without_rope_workaround_drops_scaling_and_is_caught(tmp_path, tiny_model):
    """modelopt 0.47 + transformers 5 silently drops rope_scaling; the reference reader notices."""
    hf_dir, model = _make(tiny_model, "llama", kv=4, rope=LLAMA3_ROPE)
    ckpt = modelopt_export(model, tmp_path / "ckpt", keep_rope_scaling=False)
    assert "rotary_scaling" not in json.loads((ckpt / "config.json").read_text())
    r, ok = verify(ckpt, hf_dir)
    assert not ok, report(r)


def test_global_layer_numbering_on_pp_rank_is_rejected(tmp_path, tiny_model):
    _, model = tiny_model("llama", num_hidden_layers=4)
    good = handwritten_checkpoint(model, tmp_path / "good", pp=2)

    def renumber(rank, t):
        if rank == 1:
            for k in [k for k in t if k.startswith("transformer.layers.")]:
                i = int(k.split(".")[2])
                t[k.replace(f"layers.{i}.", f"layers.{i + 2}.", 1)] = t.pop(k)

    bad = edit_copy(good, tmp_path / "bad", edit_tensors=renumber)
    with pytest.raises(UserError, match="expected local indices"):
        ReferenceModel(bad)


# ------------------------------------------------------------------------------------------------
# Bad input, unsupported features, extension point, command line
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_are_user_errors(tmp_path, fp16_tp2):
    _, good = fp16_tp2
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    partial = tmp_path / "partial"
    shutil.copytree(good, partial)
    (partial / "rank1.safetensors").unlink()
    with pytest.raises(UserError, match="rank1.safetensors is missing"):
        load_checkpoint(partial)
    nolm = edit_copy(good, tmp_path / "nolm", edit_tensors=lambda r, t: t.pop("lm_head.weight"))
    with pytest.raises(UserError, match="lm_head.weight is missing"):
        ReferenceModel(nolm).forward(torch.tensor([[1, 2]]))
    with pytest.raises(UserError, match="input_ids must lie"):
        ReferenceModel(good).forward(torch.tensor([[1, 5000]]))


def test_unsupported_quant_algo_and_dynamic_rope(tmp_path, fp16_tp2):
    _, good = fp16_tp2
    # (FP8, AWQ, W4A8 AWQ, NVFP4, SmoothQuant, weight-only and INT8/FP8 KV kernels exist)
    mx = edit_copy(good, tmp_path / "mx", edit_config=lambda c: c["quantization"].update(quant_algo="W4A8_MXFP4_FP8"))
    with pytest.raises(UserError, match="quant_algo W4A8_MXFP4_FP8 is not supported by the reference reader yet"):
        ReferenceModel(mx)
    # (NVFP4 has a KV kernel since the NVFP4 KV cache: a value no TensorRT-LLM KV cache takes)
    kv = edit_copy(good, tmp_path / "kv", edit_config=lambda c: c["quantization"].update(kv_cache_quant_algo="W4A16"))
    with pytest.raises(UserError, match="kv_cache_quant_algo W4A16 is not supported"):
        ReferenceModel(kv)
    dyn = edit_copy(good, tmp_path / "dyn", edit_config=lambda c: c.update(rotary_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(UserError, match="'dynamic' is not supported"):
        ReferenceModel(dyn)


def test_linear_dispatch_is_extensible(tmp_path, fp16_tp2, monkeypatch):
    """A new quant_algo is one registered function; lm_head stays unquantized (exclude_modules)."""
    hf_dir, good = fp16_tp2
    seen = set()

    def fake(x, params, qcfg):
        seen.add(qcfg.quant_algo)
        return LINEAR_KERNELS[None](x, params, qcfg)

    monkeypatch.setitem(LINEAR_KERNELS, "TEST_ALGO", None)   # restored after the test
    register_linear("TEST_ALGO")(fake)
    ckpt = edit_copy(good, tmp_path / "q", edit_config=lambda c: c["quantization"].update(
        quant_algo="TEST_ALGO", exclude_modules=["lm_head"]))
    ref = ReferenceModel(ckpt)
    assert ref.qcfg.algo_for("lm_head") is None
    assert ref.qcfg.algo_for("transformer.layers.0.mlp.fc") == "TEST_ALGO"
    r = compare_with_hf(ckpt, hf_dir, reference=ref)
    assert seen == {"TEST_ALGO"} and r["rel_err"] < 8 * 2.0 ** -11


def test_cli_exit_codes(tmp_path, fp16_tp2, capsys):
    hf_dir, good = fp16_tp2
    assert main([str(good), "--hf", str(hf_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("PASS") and "tp 2" in out[0]
    bad = edit_copy(good, tmp_path / "bad", edit_tensors=_swap_fc_gate)
    assert main([str(bad), "--hf", str(hf_dir), "--seq-len", "8", "--batch", "1"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("MISMATCH") and "8 tokens" in out[0]
    assert main([str(tmp_path / "missing"), "--hf", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main([str(good), "--hf", str(tmp_path / "nohf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    # --text needs a tokenizer; the tiny model has none: one-line user error, not a traceback
    assert main([str(good), "--hf", str(hf_dir), "--text", "hello"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_python_dash_m_entry_point(tmp_path):
    p = subprocess.run([sys.executable, "-m", "verify.reference", str(tmp_path / "missing"), "--hf", str(tmp_path)],
                       capture_output=True, text=True, cwd=str(Path(__file__).parents[1]))
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error:")
