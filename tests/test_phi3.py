"""Phi-3 / Phi-3.5-mini / Phi-4-mini (model/families/phi3.py): fused HF qkv_proj / gate_up_proj
split per rank, partial rotary, LongRoPE, an embedding that is not split.

- Float: the reference reader (TensorRT-LLM's semantics: the swiglu MLP's [up; gate] fc, the
  long_rope tables switched by the context length) gives HF's logits at tp 1/2/4, pp 2 and
  tp 2 x pp 2, for prompts shorter and longer than original_max_position_embeddings (32 here:
  HF and the engine both switch to the long factors past it), and the switch is shown to matter.
- Tensors: tp 1 equals nvidia-modelopt 0.47's TensorRT-LLM weight export for decoder "phi3"; at
  tp > 1 modelopt splits the fused [up; gate] fc and the embedding naively, which TensorRT-LLM's
  Phi-3 cannot run (the reader shows it), so tp 2 / 4 are checked against an independent slicing
  of the HF tensors instead.
- --target pytorch float: modelopt's export_hf_checkpoint tensor for tensor, and HF's logits.
- Weight-only: the float checkpoint's bytes with the quant_algo; KV-cache-only INT8 / FP8: the
  scales equal modelopt's (the calibrated formats: tests/test_phi3_quant.py); SmoothQuant
  refused in one line.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders.cli import main
from common.errors import UserError
from convert_helper import convert_checkpoint
from verify.reference import ReferenceModel

SHORT, LONG = 20, 48  # original_max_position_embeddings of tiny-phi3: 32
#: Phi-3-mini-4k's shape in small: full rotary, default RoPE, untied, 8 heads over 4 KV heads
PLAIN = dict(partial_rotary_factor=1.0, rope_scaling=None, max_position_embeddings=4096,
             tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=4)


def rel(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def ids_of(seq: int, batch: int = 2):
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seq))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_fp32_logits_equal_hf(tmp_path, tiny_model, tp, pp):
    hf_dir, model = tiny_model("phi3", num_hidden_layers=3)
    config = convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, pp=pp, dtype="float32",
                                progress=False)
    assert config["position_embedding_type"] == "long_rope" and config["rotary_pct"] == 0.75
    ref = ReferenceModel(tmp_path / "ck")
    for seq in (SHORT, LONG):
        ids = ids_of(seq)
        assert rel(ref.forward(ids), hf_logits(model, ids)) < 1e-5, (tp, pp, seq)


def test_plain_phi3_mini_shape(tmp_path, tiny_model):
    hf_dir, model = tiny_model("phi3", **PLAIN)
    config = convert_checkpoint(hf_dir, tmp_path / "ck", tp=4, dtype="float32", progress=False)
    assert config["position_embedding_type"] == "rope_gpt_neox" and config["rotary_pct"] == 1.0
    assert "longrope_scaling_short_factors" not in config
    ids = ids_of(LONG)
    assert rel(ReferenceModel(tmp_path / "ck").forward(ids), hf_logits(model, ids)) < 1e-5


def test_sliding_window_phi3_mini_4k(tmp_path, tiny_model, tokenizer_dir):
    """Phi-3-mini-4k's sliding_window (2047 < 4096; 8 here): HF masks every layer to it, the
    engine takes it at run time, so the config carries it as Gemma 2's does and the Triton
    repository's max_attention_window_size repeats it per layer; the reader masks alike, and
    without the window the logits differ."""
    import argparse

    import builders.triton as tr
    from triton_fakes import params

    hf_dir, model = tiny_model("phi3", sliding_window=8, **PLAIN)
    config = convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float32", progress=False)
    assert config["sliding_window"] == 8 and config["layer_types"] == ["sliding_attention"] * 2
    ids = ids_of(SHORT)
    assert rel(ReferenceModel(tmp_path / "ck").forward(ids), hf_logits(model, ids)) < 1e-5
    ec = tr.engine_config_from_checkpoint(config, argparse.Namespace(max_seq_len=2048))
    repo = tr.write_engine_repo(tmp_path / "triton", engine_dir=tmp_path / "engines",
                                tokenizer_dir=tokenizer_dir, engine_config=ec, options=None)
    assert params(tr.validate_repo(repo)["tensorrt_llm"])["max_attention_window_size"] == "8,8"
    del config["sliding_window"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    assert rel(ReferenceModel(tmp_path / "ck").forward(ids), hf_logits(model, ids)) > 1e-3


def test_fp16_within_its_tolerance(tmp_path, tiny_model):
    hf_dir, model = tiny_model("phi3")
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False)
    ids = ids_of(LONG)
    assert rel(ReferenceModel(tmp_path / "ck").forward(ids), hf_logits(model, ids)) < 4 * 2**-11


def test_long_factors_switch_by_length_and_matter(tmp_path, tiny_model):
    """The check can fail: a checkpoint whose long factors are the short ones still gives HF's
    logits for a short prompt, and not for a long one (the engine and HF switch alike)."""
    hf_dir, model = tiny_model("phi3")
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=1, dtype="float32", progress=False)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["longrope_scaling_long_factors"] = cfg["longrope_scaling_short_factors"]
    (ck / "config.json").write_text(json.dumps(cfg))
    ref = ReferenceModel(ck)
    short, long = ids_of(SHORT), ids_of(LONG)
    assert rel(ref.forward(short), hf_logits(model, short)) < 1e-5
    assert rel(ref.forward(long), hf_logits(model, long)) > 1e-3


def test_config_json_is_what_phi3_converter_writes(tmp_path, tiny_model):
    """Phi3Config.from_hugging_face (tensorrt_llm/models/phi3/config.py)."""
    hf_dir, _ = tiny_model("phi3")
    config = convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False)
    assert config["architecture"] == "Phi3ForCausalLM" and config["hidden_act"] == "swiglu"
    assert (config["rotary_base"], config["rotary_scaling"], config["rotary_pct"]) == \
        (10000.0, None, 0.75)
    assert config["original_max_position_embeddings"] == 32
    assert config["longrope_scaling_short_factors"] == [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert config["longrope_scaling_long_factors"] == [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
    assert config["use_parallel_embedding"] is False and config["tie_word_embeddings"] is True
    assert config["norm_epsilon"] == 1e-6 and config["max_position_embeddings"] == 131072


# --- tensors ------------------------------------------------------------------------------------

def modelopt_phi3_weights(model, tp: int) -> list[dict]:
    """nvidia-modelopt 0.47's TensorRT-LLM weights for decoder "phi3", per rank. Test double:
    modelopt's config step raises NotImplementedError for phi3 unless tensorrt_llm is installed,
    so that one function is replaced by a stub returning {}; the tensors are modelopt's."""
    import modelopt.torch.export.model_config_export as mce

    real = mce.convert_to_tensorrt_llm_config
    mce.convert_to_tensorrt_llm_config = lambda *a, **k: {}  # the named stub
    m = copy.deepcopy(model)
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    try:
        return [w for _, w, _ in mce.torch_to_tensorrt_llm_checkpoint(
            m, decoder_type="phi3", dtype=torch.float16, inference_tensor_parallel=tp)]
    finally:
        mce.convert_to_tensorrt_llm_config = real


def test_tp1_equals_modelopt_export(tmp_path, tiny_model):
    hf_dir, model = tiny_model("phi3", num_hidden_layers=3)
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=1, dtype="float16", progress=False)
    ours, (theirs,) = load_file(tmp_path / "ck" / "rank0.safetensors"), modelopt_phi3_weights(model, 1)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def independent_rank(hf: dict, r: int, tp: int, heads: int, kv: int, hd: int, inter: int) -> dict:
    """Rank r of layer 0 as TensorRT-LLM's Phi-3 runs it, sliced straight from the HF tensors."""
    qkv, gu = hf["model.layers.0.self_attn.qkv_proj.weight"], hf["model.layers.0.mlp.gate_up_proj.weight"]
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd])
    kvr = [r * kv // tp] if kv < tp else range(r * kv // tp, (r + 1) * kv // tp)
    kv_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kvr])
    qn, n = heads // tp * hd, inter // tp
    gate, up = gu[:inter], gu[inter:]
    return {"attention.qkv": torch.cat([q[r * qn:(r + 1) * qn], k[kv_rows], v[kv_rows]]),
            "mlp.fc": torch.cat([up[r * n:(r + 1) * n], gate[r * n:(r + 1) * n]]),
            "attention.dense": hf["model.layers.0.self_attn.o_proj.weight"][:, r * qn:(r + 1) * qn],
            "mlp.proj": hf["model.layers.0.mlp.down_proj.weight"][:, r * n:(r + 1) * n]}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_are_the_independent_slices(tmp_path, tiny_model, tp):
    hf_dir, model = tiny_model("phi3", num_hidden_layers=1)
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, dtype="float32", progress=False)
    hf = load_file(hf_dir / "model.safetensors")
    for r in range(tp):
        ours = load_file(tmp_path / "ck" / f"rank{r}.safetensors")
        for mod, want in independent_rank(hf, r, tp, 4, 2, 16, 160).items():
            assert torch.equal(ours[f"transformer.layers.0.{mod}.weight"], want), (r, mod)
        assert torch.equal(ours["transformer.vocab_embedding.weight"],
                           hf["model.embed_tokens.weight"])  # whole on every rank


def test_modelopt_tp2_layout_is_not_what_trtllm_phi3_runs(tmp_path, tiny_model):
    """Why tp > 1 is not compared with modelopt: its rank 0 mlp.fc is the whole up half (a naive
    split of [up; gate]), and its embedding is split, which Phi3Model's Embedding is not."""
    hf_dir, model = tiny_model("phi3", num_hidden_layers=1)
    theirs = modelopt_phi3_weights(model, 2)[0]
    gu = load_file(hf_dir / "model.safetensors")["model.layers.0.mlp.gate_up_proj.weight"].half()
    assert torch.equal(theirs["transformer.layers.0.mlp.fc.weight"], gu[160:])
    assert theirs["transformer.vocab_embedding.weight"].shape == (500, 64)
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False)
    ours = load_file(tmp_path / "ck" / "rank0.safetensors")
    ours["transformer.layers.0.mlp.fc.weight"] = theirs["transformer.layers.0.mlp.fc.weight"]
    save_file(ours, tmp_path / "ck" / "rank0.safetensors")
    ids = ids_of(SHORT)
    assert rel(ReferenceModel(tmp_path / "ck").forward(ids), hf_logits(model, ids)) > 1e-2


def test_check_passes_and_catches_a_split_embedding(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model("phi3")
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=2, dtype="float16", progress=False)
    assert main(["check", str(ck)]) == 0
    assert "check: PASS" in capsys.readouterr().out
    sd = load_file(ck / "rank1.safetensors")
    sd["transformer.vocab_embedding.weight"] = sd["transformer.vocab_embedding.weight"][:500].clone()
    save_file(sd, ck / "rank1.safetensors")
    assert main(["check", str(ck)]) != 0
    err = capsys.readouterr().err
    assert "check: FAIL" in err and "(500, 64)" in err and "transformer.vocab_embedding.weight" in err


# --- formats and targets --------------------------------------------------------------------------

@pytest.mark.parametrize("flag,algo", [("--int8-weight-only", "W8A16"),
                                       ("--int4-weight-only", "W4A16")])
def test_weight_only_is_the_float_checkpoint(tmp_path, tiny_model, flag, algo):
    """TensorRT-LLM quantizes weight-only formats itself when it loads a float checkpoint
    (modeling_utils preprocess_weights). Hidden 128: no feature padding at tp 2."""
    hf_dir, _ = tiny_model("phi3", hidden_size=128, intermediate_size=256, num_attention_heads=8,
                           num_key_value_heads=4)
    common = ["--model", str(hf_dir), "--tp", "2", "--checkpoint-only", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "f")]) == 0
    assert main([*common, "--output", str(tmp_path / "wo"), flag]) == 0
    cfg = json.loads((tmp_path / "wo" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == algo
    for r in (0, 1):
        name = f"checkpoint/rank{r}.safetensors"
        assert (tmp_path / "wo" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_kv_cache_scales_equal_modelopt_export(tmp_path, calib_text, kv):
    """KV-cache-only formats: each layer's kv_cache_scaling_factor equals modelopt 0.47's export
    for decoder "phi3" (on both ranks: replicated), every other tensor is the float checkpoint's,
    and the reader (with the quantized KV cache) stays close to HF. FP8: the v rows of qkv_proj
    scaled up so that the scale clears modelopt's floor of 1."""
    from examples.tiny import make_tiny_model
    from quant_common import byte_tokenizer
    from quantize.calibrate import calibrate
    from test_quantize_convert import lw, spec_for

    model = make_tiny_model(tmp_path / "hf", family="phi3").float().eval()
    if kv == "fp8":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.qkv_proj.weight[64 + 32:] *= 3000.0
        model.save_pretrained(tmp_path / "hf")
    spec = spec_for(None, kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    config = convert_checkpoint(tmp_path / "hf", tmp_path / "ours", tp=2, dtype="float16",
                                progress=False, quant=spec, calibration=lw(tmp_path, calib_text))
    assert config["quantization"]["kv_cache_quant_algo"] == kv.upper()
    convert_checkpoint(tmp_path / "hf", tmp_path / "float", tp=2, dtype="float16", progress=False)
    theirs = modelopt_phi3_weights(model, 2)
    for r in range(2):
        ours, flt = (load_file(tmp_path / d / f"rank{r}.safetensors") for d in ("ours", "float"))
        scales = sorted(k for k in theirs[r] if k.endswith("cache_scaling_factor"))
        assert len(scales) == 6 and sorted(set(ours) - set(flt)) == scales  # k, v, kv per layer
        for k in scales:
            assert torch.equal(ours[k], theirs[r][k]), (r, k)
        assert all(torch.equal(ours[k], flt[k]) for k in flt)
    if kv == "fp8":
        assert all(float(ours[k]) > 1.0 for k in scales if ".v_cache" in k)
    ids = ids_of(SHORT)
    assert rel(ReferenceModel(tmp_path / "ours").forward(ids), hf_logits(model, ids)) < 0.05


def test_pytorch_target_float_equals_modelopt_export(tmp_path, tiny_model):
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, modelopt_unified, small
    from verify.reference import compare_with_hf

    hf_dir, model = tiny_model("phi3")
    write_unified_checkpoint(hf_dir, tmp_path / "float", small(), progress=False)
    assert_same_checkpoint(tmp_path / "float", modelopt_unified(model, tmp_path / "mo",
                                                                torch.float32))
    r = compare_with_hf(tmp_path / "float", model, input_ids=ids_of(LONG))
    assert r["rel_err"] < 1e-5 and r["argmax_agreement"] == 1.0, r


ENGINE = ("float, W8A16, W4A16, KV FP8, KV INT8, FP8, FP8+KV FP8, W4A16_AWQ, W4A16_AWQ+KV FP8, "
          "W4A8_AWQ, NVFP4, NVFP4+KV FP8")
PYTORCH = "float, FP8, FP8+KV FP8, KV FP8, W4A16_AWQ, W8A16, NVFP4, NVFP4+KV FP8"


@pytest.mark.parametrize("target,flag,supported", [
    ("engine", "--smoothquant", ENGINE), ("pytorch", "--smoothquant", PYTORCH)])
def test_unproven_formats_are_refused_before_any_work(tmp_path, tiny_model, capsys, target, flag,
                                                      supported):
    hf_dir, _ = tiny_model("phi3")
    capsys.readouterr()
    argv = ["--model", str(hf_dir), "--output", str(tmp_path / "out"), "--target", target, flag]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"build_engine: error: phi3 with {err[0].split(' with ')[1].split(' on ')[0]} "
                   f"on --target {target} is not supported yet; supported: {supported}"], err
    assert not (tmp_path / "out").exists()


def test_phi3_small_is_refused_in_one_line(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model("phi3")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(cfg, architectures=["Phi3SmallForCausalLM"])))
    capsys.readouterr()
    assert main(["--model", str(hf_dir), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "architecture Phi3SmallForCausalLM" in err[0] and \
        "block-sparse attention" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,message", [
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
                        "attention_factor": 1.0}),
     "Phi3ForCausalLM longrope with its own factor / attention_factor"),
])
def test_refusals(tmp_path, tiny_model, overrides, message):
    hf_dir, _ = tiny_model("phi3", **overrides)
    with pytest.raises(UserError, match=message):
        convert_checkpoint(hf_dir, tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()
