"""--target pytorch: modelopt's unified HF checkpoint (quantize/unified/), its reference-reader
loader (verify/unified_reader.py) and the stage (builders/pytorch_target.py).

The checkpoint must equal what nvidia-modelopt 0.47's ``export_hf_checkpoint`` writes for the same
calibrated model: names, shapes, dtypes, values, hf_quant_config.json and config.json's
quantization_config. Tiny random models, 4 calibration samples x 64 tokens (fast on 2 cores).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from quantize.unified import check_supported, write_unified_checkpoint
from quantize.calibrate import calibrate
from quantize.formats import QuantSpec
from quant_common import TINY, byte_tokenizer


def small(algo=None, kv=None, **kw) -> QuantSpec:
    return QuantSpec.create(algo, kv_cache_dtype=kv, calib_size=4, calib_seq_len=64,
                            calib_batch_size=2, **kw)


def make_model(tmp_path, **overrides):
    from examples.tiny import make_tiny_model

    cfg = dict(TINY)
    cfg.update(overrides)
    return tmp_path / "hf", make_tiny_model(tmp_path / "hf", **cfg).float().eval()


def modelopt_unified(model, out_dir, dtype):
    """modelopt's own export of (a copy of) the calibrated model: the reference."""
    from modelopt.torch.export import export_hf_checkpoint

    m = copy.deepcopy(model)  # the export fuses / re-smooths / packs the model in place
    export_hf_checkpoint(m, dtype=dtype, export_dir=out_dir)
    return out_dir


def assert_same_checkpoint(ours_dir, theirs_dir):
    ours, theirs = load_file(ours_dir / "model.safetensors"), load_file(theirs_dir / "model.safetensors")
    assert sorted(ours) == sorted(theirs), f"names differ: {sorted(set(ours) ^ set(theirs))}"
    for name, b in theirs.items():
        a = ours[name]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{name}: values differ"
    q_ours, q_theirs = ours_dir / "hf_quant_config.json", theirs_dir / "hf_quant_config.json"
    assert q_ours.is_file() == q_theirs.is_file()
    if q_theirs.is_file():
        assert json.loads(q_ours.read_text()) == json.loads(q_theirs.read_text())
    c_ours = json.loads((ours_dir / "config.json").read_text())
    c_theirs = json.loads((theirs_dir / "config.json").read_text())
    assert c_ours.get("quantization_config") == c_theirs.get("quantization_config")
    return ours


@pytest.mark.parametrize("algo,kv,kw,overrides", [
    ("W8A8_SQ_PER_CHANNEL", None, {}, {}),
    ("FP8", "fp8", {}, {}),
    ("W4A16_AWQ", None, {}, {}),
    ("W4A16_AWQ", "fp8", {"awq_block_size": 64}, {"intermediate_size": 320}),
    (None, "fp8", {}, {}),
])
def test_unified_checkpoint_matches_modelopt_export(tmp_path, calib_text, algo, kv, kw, overrides):
    hf_dir, model = make_model(tmp_path, **overrides)
    spec = small(algo, kv, **kw)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibrated_model=model, progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    assert_same_checkpoint(tmp_path / "ours", theirs)


def test_weight_only_int8_streams_and_matches_modelopt(tmp_path):
    import modelopt.torch.quantization as mtq

    hf_dir, model = make_model(tmp_path)
    spec = small("W8A16")
    assert not spec.needs_calibration
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, progress=False)  # no model loaded
    ref = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
    theirs = modelopt_unified(ref, tmp_path / "modelopt", torch.float32)
    assert_same_checkpoint(tmp_path / "ours", theirs)


def test_unquantized_is_the_source_weights(tmp_path):
    hf_dir, model = make_model(tmp_path)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", small(), progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    assert_same_checkpoint(tmp_path / "ours", theirs)
    assert not (tmp_path / "ours" / "hf_quant_config.json").exists()


@pytest.mark.parametrize("algo,kv,message", [
    ("W4A16", None, "--int4-weight-only has no modelopt unified-checkpoint format"),
    ("FP8", None, None),
    ("W8A8_SQ_PER_CHANNEL", "int8", "--kv-cache-dtype int8 has no modelopt unified-checkpoint format"),
])
def test_unsupported_formats_are_refused(algo, kv, message):
    spec = QuantSpec.create(algo, kv_cache_dtype=kv)
    if message is None:
        check_supported(spec)
        return
    with pytest.raises(UserError, match=message.replace("-", r"\-")) as e:
        check_supported(spec)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# The reference reader on unified checkpoints (verify/unified_reader.py -> the same kernels)
# ---------------------------------------------------------------------------------------------

# (quant_algo, kv, max rel err vs modelopt's fake-quant model, min argmax agreement). The fake-quant
# model is the calibrated one after modelopt's own first export step (requantize_resmooth_fused_llm_layers:
# shared-input linears fused, AWQ scales folded into the norms), i.e. the model the checkpoint holds.
# FP8 differs a little more: TensorRT-LLM's PyTorch backend re-quantizes q/k/v and gate/up to the
# max scale of the group (FP8QDQLinearMethod.rescale_fused_weights), which the reader reproduces.
READER_CASES = {
    "sq": ("W8A8_SQ_PER_CHANNEL", None, 4e-2, 0.9),
    "fp8_kv": ("FP8", "fp8", 1.2e-1, 0.75),
    "awq": ("W4A16_AWQ", None, 5e-3, 0.98),
    "w4a8": ("W4A8_AWQ", None, 1.2e-1, 0.8),  # its FP8 inputs, as the TRT-LLM form's (6.8e-2)
}


def eval_ids(text):
    return torch.tensor([byte_tokenizer(text[5000:5064]), byte_tokenizer(text[9000:9064])])


@pytest.mark.parametrize("case", list(READER_CASES))
def test_reader_on_unified_matches_modelopt_fake_quant(tmp_path, calib_text, case):
    from verify.reference import compare_with_hf

    algo, kv, tol, agree = READER_CASES[case]
    hf_dir, model = make_model(tmp_path)
    float_model = copy.deepcopy(model)
    spec = small(algo, kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibrated_model=model, progress=False)
    ids = eval_ids(calib_text)
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    fake_quant = copy.deepcopy(model)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(fake_quant)
    r = compare_with_hf(tmp_path / "ours", fake_quant, input_ids=ids)
    rf = compare_with_hf(tmp_path / "ours", float_model, input_ids=ids)
    print(f"\n{case}: rel err vs modelopt fake quant {r['rel_err']:.3e}, argmax {r['argmax_agreement']:.3f}; "
          f"vs float {rf['rel_err']:.3e}")
    assert r["rel_err"] < tol and r["argmax_agreement"] >= agree, r
    assert rf["rel_err"] > r["rel_err"]  # the format really quantizes


def test_reader_on_unified_unquantized_and_weight_only(tmp_path, calib_text):
    from verify.reference import compare_with_hf

    hf_dir, model = make_model(tmp_path)
    ids = eval_ids(calib_text)
    write_unified_checkpoint(hf_dir, tmp_path / "plain", small(), progress=False)
    r = compare_with_hf(tmp_path / "plain", model, input_ids=ids)
    assert r["rel_err"] < 1e-5 and r["argmax_agreement"] == 1.0, r
    write_unified_checkpoint(hf_dir, tmp_path / "w8", small("W8A16"), progress=False)
    import modelopt.torch.quantization as mtq

    fake_quant = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
    r8 = compare_with_hf(tmp_path / "w8", fake_quant, input_ids=ids)
    r8f = compare_with_hf(tmp_path / "w8", model, input_ids=ids)
    print(f"\nunquantized rel err {r['rel_err']:.2e}; W8A16 vs modelopt fake quant {r8['rel_err']:.2e}, "
          f"vs float {r8f['rel_err']:.2e}")
    assert r8["rel_err"] < 5e-4 and r8["argmax_agreement"] == 1.0, r8  # measured 9.9e-5
    assert r8f["rel_err"] > 10 * r8["rel_err"]


# ---------------------------------------------------------------------------------------------
# The stage: DIR/hf_quantized + DIR/triton (LLM-API repository)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_stage_writes_checkpoint_and_validated_llmapi_repo(tmp_path, tokenizer_dir, tp, pp):
    import shutil

    import yaml

    from builders.pytorch_target import build_pytorch_target
    from builders.triton import check_llmapi_model_yaml, validate_repo

    hf_dir, _ = make_model(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    res = build_pytorch_target(hf_dir, out, small("W8A16"), tp=tp, pp=pp, progress=False)
    assert res["checkpoint"] == out / "hf_quantized" and (out / "hf_quantized" / "tokenizer.json").is_file()
    configs = validate_repo(res["triton"])  # Triton's ModelConfig schema
    assert "tensorrt_llm" in configs
    data = yaml.safe_load((res["triton"] / "tensorrt_llm" / "1" / "model.yaml").read_text())
    check_llmapi_model_yaml(data)
    assert data["tensor_parallel_size"] == tp and data["pipeline_parallel_size"] == pp
    assert data["model"] == str((out / "hf_quantized").absolute())
    assert json.loads((out / "hf_quantized" / "hf_quant_config.json").read_text())["quantization"][
        "quant_algo"] == "W8A16"


def test_stage_refuses_before_writing(tmp_path, tokenizer_dir):
    from builders.pytorch_target import build_pytorch_target

    hf_dir, _ = make_model(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--kv-cache-dtype int8 has no modelopt unified"):
        build_pytorch_target(hf_dir, out, QuantSpec.create("FP8", kv_cache_dtype=None) and
                             QuantSpec.create(None, kv_cache_dtype="int8"), progress=False)
    with pytest.raises(UserError, match="not divisible by tp 3"):
        build_pytorch_target(hf_dir, out, small(), tp=3, progress=False)
    with pytest.raises(UserError, match="tokenizer"):  # the tiny model has no tokenizer
        build_pytorch_target(hf_dir, out, small(), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# build_engine --target pytorch
# ---------------------------------------------------------------------------------------------

def _has_flag(flag: str) -> bool:
    from builders.cli_args import build_parser

    return any(flag in a.option_strings for a in build_parser()._actions)


def test_cli_target_pytorch(tmp_path, tokenizer_dir, capsys):
    import shutil

    from builders.cli import main

    hf_dir, model = make_model(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--target", "pytorch", "--output", str(out), "--verify",
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "verify: PASS" in text and (out / "triton" / "tensorrt_llm" / "config.pbtxt").is_file()
    assert (out / "build.json").is_file() and not (out / "checkpoint").exists()
    # the repository written is the LLM-API one, and both records say so
    info = json.loads((out / "triton" / "triton_repo.json").read_text())
    assert info["target"] == "pytorch" and info["options"]["triton_target"] == "pytorch"
    assert json.loads((out / "build.json").read_text())["options"]["triton_target"] == "pytorch"


def test_cli_target_pytorch_smoothquant_is_modelopts_recipe_and_gated(tmp_path, tokenizer_dir, capsys):
    """--target pytorch --smoothquant: modelopt's recipe (its only SmoothQuant), the quality gate
    printed and recorded in build.json."""
    import shutil

    from builders.cli import main

    hf_dir, model = make_model(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--target", "pytorch", "--output", str(out), "--smoothquant",
               "--calib-size", "2", "--calib-seq-len", "32", "--checkpoint-only", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    (gate,) = [ln for ln in text.splitlines() if ln.startswith("quality gate (modelopt W8A8_SQ_PER_CHANNEL")]
    assert "top-1 agreement" in gate
    q = json.loads((out / "build.json").read_text())["options"]["quantization"]
    assert q["quant_algo"] == "W8A8_SQ_PER_CHANNEL" and q["quality_gate"]["passed"]


@pytest.mark.parametrize("argv,message", [
    (["--int4-weight-only"], "--int4-weight-only has no modelopt unified-checkpoint format"),
    (["--smoothquant", "--kv-cache-dtype", "int8"], "--kv-cache-dtype int8 has no modelopt unified"),
    (["--tp", "3"], "not divisible by tp 3"),
    (["--triton-target", "engine"], "--triton-target engine does not apply to --target pytorch"),
])
def test_cli_target_pytorch_refusals(tmp_path, capsys, argv, message):
    from builders.cli import main

    if not all(_has_flag(a) for a in argv if a.startswith("--")):
        pytest.skip(f"build_engine has no {argv[0]} flag yet (quantization flags not wired into the CLI)")
    hf_dir, _ = make_model(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()  # the tiny model's own save progress
    rc = main(["--model", str(hf_dir), "--target", "pytorch", "--output", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M (fp16 weights, tied embeddings, 9 heads / 3 kv heads), tp 1
# ---------------------------------------------------------------------------------------------

# case -> (quant_algo, kv, QuantSpec extras). One tiny calibration per case (2 x 32 tokens of
# Shakespeare), shared by the tests below through a module-scoped cache.
SMOL_CASES = {
    "sq": ("W8A8_SQ_PER_CHANNEL", None, {}),
    "fp8_kv": ("FP8", "fp8", {}),
    "awq64": ("W4A16_AWQ", None, {"awq_block_size": 64}),  # hidden 576: group 128 does not divide it
    "w8a16": ("W8A16", None, {}),
    "none": (None, None, {}),
}
#: tensors modelopt's export takes from the calibrated model without quantizing them, i.e. in the
#: model's compute dtype (float32 after CPU calibration), where we write the source's float16
#: the format the reader test runs on SmolLM2 (calibrated once, by the checkpoint test before it)
READER_CASE = "awq64"
SOURCE_DTYPE_SUFFIXES = ("layernorm.weight", "model.norm.weight", "model.embed_tokens.weight",
                         "pre_quant_scale")


@pytest.fixture(scope="module")
def smollm2_unified(smollm2_dir, shared_text, tmp_path_factory):
    """case -> (our unified dir, modelopt's export_hf_checkpoint dir, calibrated model or None)."""
    cache = {}

    def get(case):
        if case in cache:
            return cache[case]
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from transformers import AutoModelForCausalLM

        algo, kv, kw = SMOL_CASES[case]
        spec = QuantSpec.create(algo, kv_cache_dtype=kv, calib_size=2, calib_seq_len=32,
                                calib_batch_size=1, **kw)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        if spec.needs_calibration:
            calibrate(model, spec, shared_text("shakespeare.txt", 20000), progress=False)
        elif algo == "W8A16":  # modelopt's weight-only INT8: max calibration of the weights alone
            model = mtq.quantize(model, copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
        d = tmp_path_factory.mktemp(f"smol_{case}")
        write_unified_checkpoint(smollm2_dir, d / "ours", spec,
                                 calibrated_model=model if spec.needs_calibration else None,
                                 progress=False)
        m = copy.deepcopy(model)  # the export fuses / re-smooths / packs in place
        m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
        export_hf_checkpoint(m, dtype=torch.float16, export_dir=d / "modelopt")
        del m
        # the AWQ model stays for the reader test
        cache[case] = (d / "ours", d / "modelopt", model if case == READER_CASE else None)
        return cache[case]

    return get


def load_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", list(SMOL_CASES))
def test_smollm2_unified_checkpoint_matches_modelopt_export(smollm2_unified, smollm2_dir, case):
    """Our unified checkpoint of SmolLM2 vs modelopt's export_hf_checkpoint of the same model.

    Quantized weights and every scale: same dtype, bit-identical. Float tensors modelopt takes
    from the calibrated model as they are (norms, embeddings, pre_quant_scale): modelopt writes them
    in the model's compute dtype (float32 after CPU calibration) while we write the source's float16,
    so those are compared after rounding modelopt's to float16 (exact there: the source weights are
    fp16 values; AWQ's folded norms are fp32 products both sides round the same way). Tied
    embeddings: neither writes lm_head.weight; config.json keeps tie_word_embeddings.
    """
    ours_dir, theirs_dir, _ = smollm2_unified(case)
    ours, theirs = load_dir(ours_dir), load_dir(theirs_dir)
    assert sorted(ours) == sorted(theirs), f"names differ: {sorted(set(ours) ^ set(theirs))}"
    assert "lm_head.weight" not in ours  # tied to model.embed_tokens.weight, as modelopt writes it
    cast = []
    for name, b in theirs.items():
        a = ours[name]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        if a.dtype != b.dtype:
            assert case == "none" or name.endswith(SOURCE_DTYPE_SUFFIXES), (name, a.dtype, b.dtype)
            assert (a.dtype, b.dtype) == (torch.float16, torch.float32), (name, a.dtype, b.dtype)
            assert torch.equal(a, b.to(torch.float16)), f"{name}: differs beyond fp16 rounding"
            cast.append(name)
            continue
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{name}: values differ"
    # what differs only by dtype: exactly the unquantized float tensors (30 layers x 2 norms, the
    # final norm, the embedding) plus the pre_quant_scale of every linear (SmoothQuant) or of
    # o_proj/down_proj (AWQ: q/k/v and gate/up have theirs folded into the norms), and,
    # unquantized, every linear's weight
    n_layers = 30
    expect = 2 * n_layers + 2 + {"sq": 7, "none": 7, "awq64": 2}.get(case, 0) * n_layers
    assert len(cast) == expect, (len(cast), expect)
    quantized = [n for n in ours if ours[n].dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)]
    assert len(quantized) == (0 if case == "none" else 7 * n_layers)

    q_ours, q_theirs = ours_dir / "hf_quant_config.json", theirs_dir / "hf_quant_config.json"
    assert q_ours.is_file() == q_theirs.is_file() == (case != "none")
    if q_theirs.is_file():
        assert json.loads(q_ours.read_text()) == json.loads(q_theirs.read_text())
    c_ours = json.loads((ours_dir / "config.json").read_text())
    c_theirs = json.loads((theirs_dir / "config.json").read_text())
    assert c_ours.get("quantization_config") == c_theirs.get("quantization_config")
    assert c_ours["tie_word_embeddings"] is c_theirs["tie_word_embeddings"] is True
    src = json.loads((smollm2_dir / "config.json").read_text())
    assert c_ours["torch_dtype" if "torch_dtype" in src else "dtype"] == "float16"


def test_smollm2_reader_on_unified_follows_modelopt_fake_quant(smollm2_unified, smollm2_dir,
                                                                shared_text):
    """The reference reader on our SmolLM2 INT4-AWQ (group 64) unified checkpoint: on real text its
    logits follow modelopt's fake-quant model (after the export's own fusion step, which folds the
    q/k/v and gate/up pre_quant_scale into the norms as the checkpoint holds them) far more
    closely than the float model's.

    AWQ rather than SmoothQuant here: SmolLM2 under SmoothQuant (alpha 1, static per-tensor int8
    activations, 2 x 32 calibration tokens) is ill-conditioned: the same checkpoint with 0.25 % of its
    int8 weights one step apart (rounded from fp16 vs fp32 weights) moves the logits by 0.1-0.25
    relative, so a logits bound there measures the model, not the reader (the tiny-model test above
    covers the SmoothQuant path of the reader).
    """
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verify.reference import ReferenceModel, compare_with_hf

    ours_dir, _, model = smollm2_unified(READER_CASE)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = shared_text("austen.txt", 200_000)[100_000:]
    ids = torch.tensor([tok(text[:2000])["input_ids"][:48], tok(text[5000:7000])["input_ids"][:48]])
    fake_quant = copy.deepcopy(model)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(fake_quant)
    ref = ReferenceModel(ours_dir)
    r = compare_with_hf(ours_dir, fake_quant, input_ids=ids, reference=ref)
    del fake_quant
    float_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    rf = compare_with_hf(ours_dir, float_model, input_ids=ids, reference=ref)
    print(f"\nSmolLM2 AWQ g64 unified: vs modelopt fake quant rel err {r['rel_err']:.3e}, argmax "
          f"{r['argmax_agreement']:.3f}; vs float {rf['rel_err']:.3e}, argmax {rf['argmax_agreement']:.3f}")
    assert r["rel_err"] < 4e-2 and r["argmax_agreement"] >= 0.9, r  # measured 1.7e-2, 0.958
    assert rf["rel_err"] > 3 * r["rel_err"]  # measured 0.38 vs the float model


# ---------------------------------------------------------------------------------------------
# Layer by layer from the calibration store (FP8), and --calibration shared with the engine target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo,kv,kw,overrides", [
    ("FP8", None, {}, {}),
    ("FP8", "fp8", {}, {}),
    ("W8A8_SQ_PER_CHANNEL", None, {}, {}),
    ("W4A16_AWQ", None, {}, {}),
    ("W4A16_AWQ", "fp8", {"awq_block_size": 64}, {"intermediate_size": 320}),
    (None, "fp8", {}, {}),
])
def test_from_the_calibration_store_matches_modelopt_export(tmp_path, calib_text, algo, kv, kw,
                                                            overrides):
    """Every calibrated format's unified tensors, streamed layer by layer from the layer-wise
    calibration store (+ the source weights), equal modelopt's export of the whole model
    calibrated in memory."""
    from quantize.run import CalibrationRun

    hf_dir, model = make_model(tmp_path, **overrides)
    spec = small(algo, kv, **kw)
    assert spec.format.unified_layerwise(spec)
    run = CalibrationRun(store=tmp_path / "calibration", device="cpu", calib_text=calib_text,
                         tokenizer=byte_tokenizer)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", spec, calibration=run, progress=False)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    assert_same_checkpoint(tmp_path / "ours", theirs)


@pytest.mark.parametrize("algo", ["W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"])
def test_store_path_equals_the_whole_model_path_on_a_float16_source(tmp_path, calib_text, algo):
    """A float16 source (written in float16, calibrated in float32): the unified checkpoint from
    the calibration store is byte for byte the one the whole-model path writes (which the SmolLM2
    tests compare with modelopt's export)."""
    from quantize.run import CalibrationRun

    from transformers import AutoModelForCausalLM

    hf_dir, _ = make_model(tmp_path, dtype=torch.float16)
    # loaded as calibration loads it (the float16 model's rotary buffers are float16-rounded)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    spec = small(algo)
    run = CalibrationRun(store=tmp_path / "calibration", device="cpu", calib_text=calib_text,
                         tokenizer=byte_tokenizer)
    write_unified_checkpoint(hf_dir, tmp_path / "store", spec, calibration=run, progress=False)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "whole", spec, calibrated_model=model,
                             progress=False)
    ours = load_file(tmp_path / "store" / "model.safetensors")
    assert {t.dtype for n, t in ours.items() if n.endswith("pre_quant_scale")} == {torch.float16}
    assert (tmp_path / "store" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("flags", [["--fp8"], ["--fp8", "--kv-cache-dtype", "fp8"],
                                   ["--smoothquant", "--sq-recipe", "modelopt"], ["--awq"]])
def test_cli_pytorch_reuses_an_engine_targets_calibration(tmp_path, tokenizer_dir, capsys, flags):
    """--target pytorch --calibration DIR/calibration of an engine-target run of the same format:
    the same unified checkpoint as a fresh --target pytorch run (whose own layer-wise store is
    temporary)."""
    import shutil

    from builders.cli import main

    hf_dir, _ = make_model(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    common = ["--model", str(hf_dir), *flags, "--calib-size", "2", "--calib-seq-len", "32",
              "--checkpoint-only", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "engine")]) == 0
    capsys.readouterr()
    assert main([*common, "--target", "pytorch", "--output", str(tmp_path / "fresh")]) == 0
    text = capsys.readouterr().out
    assert "memory plan: " in text and "calibration: " in text, text
    assert main([*common, "--target", "pytorch", "--output", str(tmp_path / "reused"),
                 "--calibration", str(tmp_path / "engine" / "calibration")]) == 0
    text = capsys.readouterr().out
    assert "memory plan: " in text and "reused " in text, text
    for d in ("fresh", "reused"):
        assert sorted(p.name for p in (tmp_path / d).iterdir() if not p.name.startswith(".")) \
            == ["build.json", "hf_quantized"]
    for f in ("model.safetensors", "config.json", "hf_quant_config.json"):
        a = (tmp_path / "fresh" / "hf_quantized" / f).read_bytes()
        assert a == (tmp_path / "reused" / "hf_quantized" / f).read_bytes(), f


def test_cli_pytorch_refuses_another_formats_calibration(tmp_path, tokenizer_dir, capsys):
    """--calibration made for another format: one line, exit 2, nothing written."""
    import shutil

    from builders.cli import main

    hf_dir, _ = make_model(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    common = ["--model", str(hf_dir), "--calib-size", "2", "--calib-seq-len", "32",
              "--checkpoint-only", "--no-progress"]
    assert main([*common, "--fp8", "--kv-cache-dtype", "fp8", "--output", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    rc = main([*common, "--fp8", "--target", "pytorch", "--output", str(tmp_path / "p"),
               "--calibration", str(tmp_path / "e" / "calibration")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "was made from other inputs (recipe differ)" in err, err
    assert not (tmp_path / "p" / "hf_quantized").exists()
