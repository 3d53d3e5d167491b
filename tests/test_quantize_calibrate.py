"""Quantization phase 1: option validation (quantize/formats.py) and calibration + extraction
(quantize/calibrate.py). The extracted, mapped and sharded tensors must equal what nvidia-modelopt
0.47's export_tensorrt_llm_checkpoint writes for the same calibrated model, at tp 1 and 2 (and with
kv heads < tp where modelopt supports it)."""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from quantize.calibrate import calibrate, make_calib_batches
from quantize.modelopt_state import extract_quant_state, shard_quant_state
from quantize.formats import (
    DEFAULT_CALIB_DATA,
    DEFAULT_SMOOTHQUANT_ALPHA,
    TRTLLM_DEFAULT_EXCLUDE_MODULES,
    QuantSpec,
    add_quant_arguments,
    check_awq_divisibility,
    check_kv_head_duplication,
)
from quant_common import TINY, byte_tokenizer


def parse(*argv: str) -> QuantSpec:
    p = argparse.ArgumentParser()
    add_quant_arguments(p)
    return QuantSpec.from_args(p.parse_args(list(argv)))


def make_model(tmp_path, **overrides):
    from examples.tiny import make_tiny_model

    cfg = dict(TINY)
    cfg.update(overrides)
    return make_tiny_model(tmp_path / "hf", **cfg).float().eval()


def small(spec: QuantSpec) -> QuantSpec:
    """Few short samples: keep the 2-core CI fast."""
    return QuantSpec.create(spec.quant_algo, kv_cache_dtype=(spec.kv_cache_quant_algo or "").lower() or None,
                            smoothquant_alpha=spec.smoothquant_alpha, awq_block_size=spec.group_size,
                            calib_size=4, calib_seq_len=64, calib_batch_size=2)


def modelopt_export(model, out_dir, tp: int):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)  # the export re-smooths / pads the model in place
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type="llama", dtype=torch.float16, export_dir=out_dir,
                                   inference_tensor_parallel=tp)
    return out_dir


QUANT_SUFFIXES = ("weights_scaling_factor", "activation_scaling_factor", "prequant_scaling_factor",
                  "cache_scaling_factor")
QUANT_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def ours_domain(name: str, weights_quantized: bool) -> bool:
    if name.endswith(QUANT_SUFFIXES):
        return True
    return weights_quantized and name.endswith(".weight") and any(f".{p}.weight" in name for p in QUANT_LINEARS)


def assert_same(ours: dict, theirs: dict, where: str):
    assert sorted(ours) == sorted(theirs), f"{where}: names differ: {sorted(set(ours) ^ set(theirs))}"
    for name, b in theirs.items():
        a = ours[name]
        assert a.shape == b.shape, (where, name, a.shape, b.shape)
        assert a.dtype == b.dtype, (where, name, a.dtype, b.dtype)
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        # the same math as modelopt's export, op for op: bit-identical (scales included)
        assert torch.equal(a, b), f"{where}: {name}: values differ"


def check_against_modelopt(model, spec, tmp_path, tps=(1, 2)):
    cfg = model.config
    state = extract_quant_state(model, spec)
    weights_quantized = spec.quant_algo in ("W8A8_SQ_PER_CHANNEL", "FP8", "W4A16_AWQ")
    for tp in tps:
        out = modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp)
        conf = json.loads((out / "config.json").read_text())
        if weights_quantized:
            # same keys, values and order as modelopt writes
            assert list(conf["quantization"].items()) == list(spec.to_trtllm_quantization().items())
        else:
            assert conf["quantization"]["kv_cache_quant_algo"] == spec.kv_cache_quant_algo
        for r in range(tp):
            theirs = {k: v for k, v in load_file(out / f"rank{r}.safetensors").items()
                      if ours_domain(k, weights_quantized)}
            ours = shard_quant_state(state, spec, num_heads=cfg.num_attention_heads,
                                     num_kv_heads=cfg.num_key_value_heads, tp=tp, rank=r)
            assert_same(ours, theirs, f"tp{tp} rank{r}")
    return state


# ---------------------------------------------------------------------------------------------
# Extraction vs modelopt's export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,overrides,tps", [
    (["--smoothquant", "--sq-recipe", "modelopt"], {}, (1, 2)),
    (["--smoothquant", "0.5", "--sq-recipe", "modelopt", "--kv-cache-dtype", "int8"], {}, (1, 2)),
    (["--fp8"], {}, (1, 2)),
    (["--fp8", "--kv-cache-dtype", "fp8"], {}, (1, 2, 8)),      # tp 8 > 4 kv heads: k/v duplicated
    (["--awq"], {"intermediate_size": 768}, (1, 2)),
    (["--awq", "--kv-cache-dtype", "fp8"], {}, (1, 2)),
    (["--awq", "--awq-block-size", "64", "--kv-cache-dtype", "int8"], {"intermediate_size": 640}, (1, 2)),
])
def test_extracted_state_matches_modelopt_export(tmp_path, calib_text, argv, overrides, tps):
    spec = small(parse(*argv))
    model = make_model(tmp_path, **overrides)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    attn = model.model.layers[1].self_attn
    q_pqs = attn.q_proj.input_quantizer._pre_quant_scale if spec.quant_algo != "FP8" else None
    if spec.quant_algo == "W4A16_AWQ" or spec.smoothquant_alpha not in (None, 1.0):
        # the re-smoothing path of the q/k/v fusion is exercised (with SmoothQuant alpha 1 the
        # smoother is 1/activation-amax, the same for modules sharing an input: nothing to average)
        assert not torch.equal(q_pqs, attn.k_proj.input_quantizer._pre_quant_scale)
    elif q_pqs is not None:
        assert torch.equal(q_pqs, attn.k_proj.input_quantizer._pre_quant_scale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = check_against_modelopt(model, spec, tmp_path, tps)
    after = model.state_dict()  # extraction (and the deep-copied exports) left the model alone
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # fused q/k/v share pre_quant_scale and activation scale (and FP8 weight scale); FP8 gate/up too
    p = "model.layers.1"
    for suffix in ("prequant_scaling_factor", "activation_scaling_factor"):
        q = state.get(f"{p}.self_attn.q_proj.{suffix}")
        if q is not None:
            for other in ("k_proj", "v_proj"):
                assert torch.equal(q, state[f"{p}.self_attn.{other}.{suffix}"]), suffix
    if spec.quant_algo == "FP8":
        for suffix in ("weights_scaling_factor", "activation_scaling_factor"):
            assert torch.equal(state[f"{p}.mlp.gate_proj.{suffix}"], state[f"{p}.mlp.up_proj.{suffix}"])
    if spec.quant_algo == "W4A16_AWQ":
        g = spec.group_size
        assert state[f"{p}.mlp.down_proj.weight"].shape == (TINY["hidden_size"] // 2, model.config.intermediate_size)
        assert state[f"{p}.mlp.down_proj.weights_scaling_factor"].shape == (
            TINY["hidden_size"], model.config.intermediate_size // g)


def test_kv_cache_only_with_weight_only_format(tmp_path, calib_text):
    """W8A16 + INT8 KV: only k/v scales are calibrated; the linears stay float (trtllm-build
    quantizes them), the quantization block says W8A16 with TensorRT-LLM's default exclusions."""
    spec = small(parse("--int8-weight-only", "--kv-cache-dtype", "int8"))
    assert spec.needs_calibration and spec.is_weight_only
    cfg = spec.modelopt_config()
    assert cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    model = make_model(tmp_path)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    state = check_against_modelopt(model, spec, tmp_path, (1, 2))
    assert sorted({k.rsplit(".", 1)[1] for k in state}) == [
        "k_cache_scaling_factor", "kv_cache_scaling_factor", "v_cache_scaling_factor"]
    assert spec.to_trtllm_quantization() == {
        "quant_algo": "W8A16", "kv_cache_quant_algo": "INT8",
        "exclude_modules": list(TRTLLM_DEFAULT_EXCLUDE_MODULES)}


def test_smoothquant_kv_heads_below_tp_is_rejected_like_modelopt(tmp_path, calib_text):
    spec = small(parse("--smoothquant", "--sq-recipe", "modelopt"))
    with pytest.raises(UserError, match="needs at least 8 KV heads"):
        check_kv_head_duplication(small(parse("--smoothquant")), num_kv_heads=4, tp=8)
    with pytest.raises(UserError, match="needs at least 8 KV heads"):
        check_kv_head_duplication(spec, num_kv_heads=4, tp=8)
    check_kv_head_duplication(small(parse("--awq")), num_kv_heads=4, tp=8)
    model = make_model(tmp_path, num_hidden_layers=1)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    with pytest.raises(NotImplementedError, match="Duplicating KV heads"):
        modelopt_export(model, tmp_path / "tp8", 8)


def test_calibrate_from_directory_with_tokenizer(tmp_path, calib_text):
    """The directory path: model and tokenizer loaded from HF files, BOS prepended to samples."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from quantize.calibrate import bos_if_added

    make_model(tmp_path, num_hidden_layers=1)
    with pytest.raises(UserError, match="tokenizer"):
        calibrate(tmp_path / "hf", small(parse("--fp8")), calib_text, progress=False)
    words = [w for w, _ in Counter(calib_text.split()).most_common(900)]
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert bos_if_added(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")) is None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    assert bos_if_added(hf_tok) == 1  # a Llama-style tokenizer: samples start with BOS
    hf_tok.save_pretrained(tmp_path / "hf")
    spec = small(parse("--fp8", "--kv-cache-dtype", "fp8"))
    calibrated = calibrate(tmp_path / "hf", spec, calib_text, device="cpu", progress=False)
    state = extract_quant_state(calibrated, spec)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert (state["model.layers.0.self_attn.kv_cache_scaling_factor"] >= 1.0).all()  # FP8 KV clamp


# ---------------------------------------------------------------------------------------------
# Calibration samples
# ---------------------------------------------------------------------------------------------


def test_make_calib_batches():
    ids = list(range(100))
    b = make_calib_batches(ids, calib_size=4, seq_len=10, batch_size=3)
    assert [t.shape for t in b] == [(3, 10), (1, 10)]
    assert b[0][1].tolist() == list(range(10, 20))  # consecutive, non-overlapping
    b = make_calib_batches(ids, calib_size=20, seq_len=10, batch_size=20, bos_token_id=7)
    assert b[0].shape == (20, 10) and (b[0][:, 0] == 7).all()
    assert b[0][0, 1:].tolist() == list(range(9)) and b[0][-1, 1:].tolist() == list(range(91, 100))
    b = make_calib_batches([1, 2, 3], calib_size=2, seq_len=10, batch_size=4)
    assert b[0].tolist() == [[1, 2, 3], [1, 2, 3]]  # shorter than seq_len: the whole stream


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def test_defaults_and_formats():
    none = parse()
    assert not none.is_quantized and not none.needs_calibration and none.modelopt_config() is None
    assert none.to_trtllm_quantization() == {"quant_algo": None, "kv_cache_quant_algo": None}

    sq = parse("--smoothquant", "--sq-recipe", "modelopt")
    assert sq.quant_algo == "W8A8_SQ_PER_CHANNEL" and sq.smoothquant_alpha == DEFAULT_SMOOTHQUANT_ALPHA == 1.0
    assert sq.modelopt_config()["algorithm"] == {"method": "smoothquant", "alpha": 1.0}
    assert parse("--smoothquant", "0.5", "--sq-recipe", "modelopt").modelopt_config()["algorithm"]["alpha"] == 0.5
    assert sq.to_trtllm_quantization() == {"quant_algo": "W8A8_SQ_PER_CHANNEL", "kv_cache_quant_algo": None,
                                           "exclude_modules": ["lm_head"]}
    assert sq.calib_data == DEFAULT_CALIB_DATA and sq.needs_calibration

    awq = parse("--awq", "--kv-cache-dtype", "fp8")
    assert awq.to_trtllm_quantization() == {
        "quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8", "group_size": 128,
        "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
    cfg = parse("--awq", "--awq-block-size", "64").modelopt_config()
    wq = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"][0]["cfg"]
    assert wq["block_sizes"][-1] == 64
    import modelopt.torch.quantization as mtq  # the global config is untouched

    assert [e for e in mtq.INT4_AWQ_CFG["quant_cfg"]
            if e.get("quantizer_name") == "*weight_quantizer"][0]["cfg"]["block_sizes"][-1] == 128
    assert awq.modelopt_config()["quant_cfg"][-1]["quantizer_name"] == "*[kv]_bmm_quantizer"

    for flag, algo in (("--int8-weight-only", "W8A16"), ("--int4-weight-only", "W4A16")):
        wo = parse(flag)
        assert wo.quant_algo == algo and wo.is_weight_only and not wo.needs_calibration
        assert wo.modelopt_config() is None
        assert wo.to_trtllm_quantization()["exclude_modules"] == list(TRTLLM_DEFAULT_EXCLUDE_MODULES)

    kv = parse("--kv-cache-dtype", "fp8")
    assert kv.needs_calibration and kv.quant_algo is None
    assert kv.to_trtllm_quantization() == {"quant_algo": None, "kv_cache_quant_algo": "FP8"}


@pytest.mark.parametrize("argv,message", [
    (["--fp8", "--awq"], "choose one weight quantization format, got --fp8 and --awq"),
    (["--smoothquant", "--int8-weight-only"], "choose one weight quantization format"),
    (["--fp8", "--kv-cache-dtype", "int8"], "--fp8 with --kv-cache-dtype int8 is not supported"),
    (["--awq-block-size", "64"], "--awq-block-size only applies to --awq"),
    (["--awq", "--awq-block-size", "32"], "--awq-block-size 32 is not supported"),
    (["--fp8", "--calib-size", "0"], "--calib-size must be a positive integer, got 0"),
    (["--fp8", "--calib-seq-len", "-5"], "--calib-seq-len must be a positive integer"),
    (["--fp8", "--calib-batch-size", "0"], "--calib-batch-size must be a positive integer"),
    (["--fp8", "--calib-data", "/nonexistent/calib.txt"], "--calib-data /nonexistent/calib.txt does not exist"),
    (["--int8-weight-only", "--calib-data", "/nonexistent/x.txt"], "does not exist"),  # given: checked
])
def test_option_errors(argv, message):
    with pytest.raises(UserError) as e:
        parse(*argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_calib_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n\t")
    with pytest.raises(UserError, match="is empty"):
        parse("--smoothquant", "--calib-data", str(empty))
    with pytest.raises(UserError, match="is not a file"):
        parse("--fp8", "--calib-data", str(tmp_path))
    good = tmp_path / "calib.txt"
    good.write_text("some words")
    assert parse("--fp8", "--calib-data", str(good)).read_calib_text() == "some words"
    assert parse("--int4-weight-only").calib_data == DEFAULT_CALIB_DATA  # not needed, not read


@pytest.mark.parametrize("argv,algo,alpha", [
    ((), "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", 0.75),
    (("0.75", "--sq-activations", "tensor"), "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", 0.75),
    (("--sq-weights", "tensor"), "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", 0.75),
    (("1", "--sq-weights", "tensor", "--sq-activations", "tensor", "--sq-recipe", "trtllm"),
     "W8A8_SQ_PER_TENSOR_PLUGIN", 1.0),
])
def test_smoothquant_recipes(argv, algo, alpha):
    """--smoothquant is TensorRT-LLM's plugin recipe (per channel + per token, alpha 0.75 by default);
    its config block is TensorRT-LLM's QuantConfig as convert_checkpoint.py writes it."""
    sq = parse("--smoothquant", *argv)
    assert (sq.quant_algo, sq.smoothquant_alpha, sq.is_sq_plugin, sq.needs_calibration) == (algo, alpha, True, True)
    assert sq.modelopt_config() is None and algo in sq.recipe
    assert sq.to_trtllm_quantization() == {
        "quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": alpha,
        "clamp_val": None, "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None}
    auto = parse("--smoothquant", "auto", *argv[1:] if argv and argv[0][0].isdigit() else argv)
    assert auto.sq_alpha_search and auto.smoothquant_alpha is None and auto.quant_algo == algo


@pytest.mark.parametrize("argv,match", [
    (("--sq-recipe", "modelopt"), "applies to --smoothquant"),
    (("--smoothquant", "--sq-recipe", "modelopt", "--sq-activations", "token"), "drop --sq-activations"),
    (("--smoothquant", "auto", "--sq-recipe", "modelopt"), "searches alpha for TensorRT-LLM's recipe only"),
    (("--smoothquant", "--kv-cache-dtype", "fp8"), "placeholder FP8 KV scale"),
    (("--smoothquant", "--max-ppl-increase", "-1"), "must be a percentage >= 0"),
])
def test_smoothquant_recipe_mistakes(argv, match):
    with pytest.raises(UserError, match=match):
        parse(*argv)


def test_smoothquant_alpha_range():
    with pytest.raises(SystemExit):  # argparse reports a bad ALPHA (exit 2)
        parse("--smoothquant", "1.5")
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        QuantSpec.create("W8A8_SQ_PER_CHANNEL", smoothquant_alpha=-0.1)


def test_awq_divisibility():
    check_awq_divisibility({"attention.dense": 128, "mlp.proj": 384}, 128)
    with pytest.raises(UserError, match=r"mlp\.proj input size per rank 344 is not a multiple of the AWQ "
                                        r"group size 128"):
        check_awq_divisibility({"attention.dense": 256, "mlp.proj": 344}, 128)
    with pytest.raises(UserError, match="--awq-block-size 64"):
        check_awq_divisibility([192], 128)


def test_shipped_calibration_text():
    text = DEFAULT_CALIB_DATA.read_text(encoding="utf-8")
    assert 50_000 <= len(text.encode()) <= 100_000 and text.strip()
