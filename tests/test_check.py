"""``build_engine check``: the checkpoints this project writes pass TensorRT-LLM 1.x's load rules
as check/ restates them (every family, format and layout written here), and a hand-broken
checkpoint fails in one line with TensorRT-LLM's words and exit 1; what is not a checkpoint is
named (exit 2); modelopt 0.47's own export is checked, and where it writes what TensorRT-LLM 1.2
would reject (INT4 AWQ at tp 2 without the padded features), check says so."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders.cli import main
from check import check_dir
from check.declared import declared_rank
from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.formats import DEFAULT_CALIB_DATA, QuantSpec
from quantize.run import CalibrationRun

TEXT = DEFAULT_CALIB_DATA.read_text(encoding="utf-8")[:20000]
CALIB = dict(calib_size=2, calib_seq_len=32, calib_batch_size=2)
FIT = dict(TINY, intermediate_size=768)  # weight-only / AWQ friendly: every K % 64, N % 64


def run(*argv, capsys):
    capsys.readouterr()  # only this command's output
    code = main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """family -> (hf_dir, fp32 model) of tiny random models, made once per module."""
    from examples.tiny import make_tiny_model

    made = {}

    def get(family):
        if family not in made:
            d = tmp_path_factory.mktemp(f"hf_{family}")
            made[family] = (d, make_tiny_model(d, family=family, **FIT).float().eval())
        return made[family]

    return get


@pytest.fixture(scope="module")
def float_ckpt(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("float") / "ckpt"
    convert_checkpoint(hf("llama")[0], d, tp=2, dtype="float16", progress=False)
    return d


# --- the project's checkpoints pass -------------------------------------------------------------

@pytest.mark.parametrize("family,tp,pp,moe_tp,moe_ep", [
    ("llama", 1, 1, None, None), ("llama", 2, 2, None, None), ("qwen2", 2, 1, None, None),
    ("mistral", 4, 1, None, None), ("mixtral", 2, 1, 2, 1), ("mixtral", 2, 1, 1, 2),
    ("mixtral", 4, 1, 2, 2), ("qwen3", 2, 1, None, None), ("gemma2", 1, 2, None, None)])
def test_float_checkpoints_pass(tmp_path, hf, family, tp, pp, moe_tp, moe_ep):
    out = tmp_path / "ckpt"
    convert_checkpoint(hf(family)[0], out, tp=tp, pp=pp, moe_tp=moe_tp, moe_ep=moe_ep,
                       dtype="float16", progress=False)
    result = check_dir(out)
    assert result.exit_code == 0, result.summary()
    assert result.ranks == list(range(tp * pp)) and not result.findings
    # every tensor of every rank was compared with a declared parameter
    assert result.tensors == sum(len(load_file(out / f"rank{r}.safetensors")) for r in range(tp * pp))


@pytest.mark.parametrize("family,algo,kv,block", [
    ("llama", "FP8", "fp8", None),
    ("llama", "W8A8_SQ_PER_CHANNEL", "int8", None),
    ("llama", "W4A16_AWQ", None, 64),
    ("qwen2", "W4A16_AWQ", "fp8", 128),
    ("llama", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "int8", None),
    ("llama", "W8A8_SQ_PER_TENSOR_PLUGIN", None, None),
    ("llama", "W8A16", None, None), ("llama", "W4A16", "int8", None),
], ids=["fp8", "sq_modelopt_kv_int8", "awq64", "qwen2_awq128_kv_fp8", "sq_plugin_kv_int8",
        "sq_plugin_per_tensor", "w8a16", "w4a16_kv_int8"])
def test_quantized_checkpoints_pass_at_tp1_and_tp2(tmp_path, hf, family, algo, kv, block):
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, awq_block_size=block, **CALIB)
    store = CalibrationRun(store=tmp_path / "calibration", temporary=False, device="cpu",
                           calib_text=TEXT, tokenizer=byte_tokenizer)
    for tp in (1, 2):  # the second conversion reuses the calibration
        out = tmp_path / f"tp{tp}"
        convert_checkpoint(hf(family)[0], out, tp=tp, dtype="float16", progress=False,
                           quant=spec, calibration=store)
        result = check_dir(out)
        assert result.exit_code == 0, result.summary()
        assert not [f for f in result.findings if f.kind != "dtype"], result.summary()


@pytest.mark.parametrize("algo,tp,moe_tp,moe_ep", [("FP8", 2, 1, 2), ("W8A16", 2, 2, 1),
                                                   ("W4A16", 4, 2, 2)])
def test_quantized_mixture_of_experts_pass(tmp_path, hf, algo, tp, moe_tp, moe_ep):
    from quantize.calibrate import calibrate
    from transformers import AutoModelForCausalLM

    hf_dir, _ = hf("mixtral")
    spec = QuantSpec.create(algo, kv_cache_dtype="fp8" if algo == "FP8" else None, **CALIB)
    model = None
    if spec.needs_calibration:
        fresh = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model = calibrate(fresh, spec, TEXT, tokenizer=byte_tokenizer, progress=False)
    out = tmp_path / "ckpt"
    convert_checkpoint(hf_dir, out, tp=tp, moe_tp=moe_tp, moe_ep=moe_ep, dtype="float16",
                       quant=spec, calibrated_model=model, progress=False)
    result = check_dir(out)
    assert result.exit_code == 0 and not result.findings, result.summary()


def test_cli_pass_line_and_json(float_ckpt, capsys):
    code, out, err = run(float_ckpt, capsys=capsys)
    assert code == 0 and err == ""
    assert one_line(out).startswith(f"check: PASS {float_ckpt}: LlamaForCausalLM, float16 float, "
                                    f"tp 2 pp 1, 2 rank(s): ")
    code, out, _ = run(float_ckpt, "--json", capsys=capsys)
    doc = json.loads(out)
    assert (code, doc["status"], doc["exit_code"], doc["ranks_checked"]) == (0, "pass", 0, [0, 1])


# --- hand-broken checkpoints: one line, TensorRT-LLM's words, exit 1 ---------------------------

def broken(src, tmp_path, edit_rank0=None, edit_config=None):
    d = tmp_path / "broken"
    shutil.copytree(src, d)
    if edit_rank0 is not None:
        tensors = load_file(d / "rank0.safetensors")
        edit_rank0(tensors)
        save_file(tensors, d / "rank0.safetensors")
    if edit_config is not None:
        config = json.loads((d / "config.json").read_text())
        edit_config(config)
        (d / "config.json").write_text(json.dumps(config))
    return d


QKV = "transformer.layers.0.attention.qkv.weight"


def test_missing_tensor(float_ckpt, tmp_path, capsys):
    d = broken(float_ckpt, tmp_path, lambda t: t.pop(QKV))
    code, out, err = run(d, capsys=capsys)
    assert (code, out) == (1, "")
    assert one_line(err) == (f"check: FAIL {d}: LlamaForCausalLM, float16 float, tp 2 pp 1, 2 "
                             f"rank(s): rank 0: RuntimeError: Required but not provided tensors: "
                             f"{{'{QKV}'}} (1 of 17)")


def test_wrong_shape(float_ckpt, tmp_path, capsys):
    d = broken(float_ckpt, tmp_path, lambda t: t.update({QKV: t[QKV][:-8].clone()}))
    code, _, err = run(d, capsys=capsys)
    assert code == 1
    assert one_line(err).endswith(
        "rank 0: Encounter error 'The value updated is not the same shape as the original. "
        f"Updated: (248, 256), original: (256, 256)' for parameter '{QKV}' (Linear / RowLinear)")


def test_wrong_dtype(float_ckpt, tmp_path, capsys):
    """An int8 weight where the float model declares float16 fails; a float width difference is
    the warning TensorRT-LLM's load prints, and the checkpoint passes."""
    d = broken(float_ckpt, tmp_path, lambda t: t.update({QKV: t[QKV].to(torch.int8)}))
    code, _, err = run(d, capsys=capsys)
    assert code == 1
    assert one_line(err).endswith(
        f"rank 0: Parameter was initialized as float16 but set to int8 for parameter '{QKV}' "
        "(Linear / RowLinear): an integer / floating mismatch the quantized kernels cannot take")
    norm = "transformer.layers.0.input_layernorm.weight"
    shutil.rmtree(d)
    d = broken(float_ckpt, tmp_path, lambda t: t.update({norm: t[norm].float()}))
    code, out, _ = run(d, capsys=capsys)
    assert code == 0
    assert one_line(out).endswith(
        f"; warnings: Parameter was initialized as float16 but set to float32 for parameter "
        f"'{norm}' (RmsNorm): a warning at load (the parameter takes the value's dtype) (1 in all)")


def test_extra_tensor_is_a_warning(float_ckpt, tmp_path, capsys):
    d = broken(float_ckpt, tmp_path, lambda t: t.update({"transformer.stray": torch.zeros(2)}))
    code, out, _ = run(d, capsys=capsys)
    assert code == 0
    assert "warnings: Provided but not required tensors: {'transformer.stray'}" in one_line(out)


@pytest.mark.parametrize("family,drop,expect", [
    ("qwen2", "qwen_type", "config.json has no \"qwen_type\" for QWenForCausalLM: QWenConfig "
                           "defaults it to 'qwen' (Qwen 1), whose MLP is intermediate_size // 2 "
                           "wide: add \"qwen_type\": \"qwen2\""),
    ("qwen3", "qwen_type", "config.json has no \"qwen_type\" for QWenForCausalLM: QWenConfig "
                           "defaults it to 'qwen' (Qwen 1): without \"qwen_type\": \"qwen3\" the "
                           "q/k layernorms are not built"),
    ("mixtral", "moe", "config.json has no \"moe\" for LLaMAForCausalLM: without a moe block "
                       "MoeConfig has 0 experts"),
    ("llama", "dtype", "TypeError: __init__() missing 1 required keyword-only argument(s): "
                       "'dtype' (PretrainedConfig)"),
    ("llama", "architecture", "KeyError: 'architecture' (PretrainedConfig.from_dict looks up "
                              "MODEL_MAP[config['architecture']])"),
])
def test_missing_config_field(tmp_path, hf, capsys, family, drop, expect):
    src = tmp_path / "ckpt"
    convert_checkpoint(hf(family)[0], src, tp=2, dtype="float16", progress=False)
    d = broken(src, tmp_path, edit_config=lambda c: c.pop(drop))
    code, _, err = run(d, capsys=capsys)
    assert code == 1 and expect in one_line(err), err


def test_missing_rank_file(float_ckpt, tmp_path, capsys):
    d = broken(float_ckpt, tmp_path)
    (d / "rank1.safetensors").unlink()
    code, _, err = run(d, capsys=capsys)
    assert code == 1
    assert one_line(err).endswith("rank 1: rank1.safetensors is missing: from_checkpoint asserts "
                                  "os.path.isfile(weights_path) for rank 1 of world_size 2")


# --- not a checkpoint: named, exit 2 -------------------------------------------------------------

def test_hf_directory_given(hf, capsys):
    hf_dir = hf("llama")[0]
    code, out, err = run(hf_dir, capsys=capsys)
    assert (code, out) == (2, "")
    assert one_line(err) == (
        f"build_engine check: error: {hf_dir} is a Hugging Face model directory; trtllm-build "
        f"needs a TensorRT-LLM checkpoint (it would fail with KeyError: 'architecture'): run "
        f"build_engine --model {hf_dir} --output OUT ... and check OUT/checkpoint")


def test_unified_checkpoint_given(tmp_path, hf, capsys):
    """The --target pytorch output: modelopt's unified HF checkpoint (INT8 weight-only, which
    needs no calibration)."""
    code = main(["--model", str(hf("llama")[0]), "--target", "pytorch", "--int8-weight-only",
                 "--output", str(tmp_path / "out"), "--triton-target", "none", "--no-progress"])
    assert code == 0
    d = tmp_path / "out" / "hf_quantized"
    capsys.readouterr()
    code, _, err = run(d, capsys=capsys)
    assert code == 2
    assert one_line(err) == (
        f"build_engine check: error: {d} is a modelopt unified (Hugging Face) checkpoint, loaded "
        f"by TensorRT-LLM's PyTorch backend (trtllm-serve {d}), not by trtllm-build; for engines "
        f"convert the source model with build_engine --model HF_DIR --target engine")


def test_other_directory_given(tmp_path, capsys):
    code, _, err = run(tmp_path, capsys=capsys)
    assert code == 2 and "is not a TensorRT-LLM checkpoint" in one_line(err)


# --- modelopt 0.47's own TensorRT-LLM export ----------------------------------------------------

def modelopt_export(model, out_dir, tp):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)  # the export re-smooths / pads the model in place
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type="llama", dtype=torch.float16, export_dir=out_dir,
                                   inference_tensor_parallel=tp)
    return out_dir


def test_modelopt_export_checked_and_unpadded_awq_at_tp2_rejected(tmp_path, capsys):
    """modelopt's AWQ export (group 64) of a model whose fused qkv output (8 heads + 2 x 2 KV heads
    of 48 = 576) is a multiple of 64 but not of max(64, group) * tp = 128: at tp 1 TensorRT-LLM
    declares the features as they are (passes); at tp 2 WeightOnlyGroupwiseQuantLinear pads the
    full output features 576 -> 640 (320 per rank), which modelopt's export does not, so
    TensorRT-LLM 1.2 would reject the checkpoint (modelopt itself only checks that each rank's
    inputs hold whole groups)."""
    from examples.tiny import make_tiny_model
    from quantize.calibrate import calibrate

    model = make_tiny_model(tmp_path / "hf", hidden_size=256, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=48, intermediate_size=512,
                            vocab_size=1024, num_hidden_layers=2).float().eval()
    spec = QuantSpec.create("W4A16_AWQ", awq_block_size=64, **CALIB)
    calibrate(model, spec, TEXT, tokenizer=byte_tokenizer, progress=False)
    tp1 = modelopt_export(model, tmp_path / "modelopt_tp1", 1)
    assert check_dir(tp1).exit_code == 0, check_dir(tp1).summary()
    tp2 = modelopt_export(model, tmp_path / "modelopt_tp2", 2)
    code, _, err = run(tp2, capsys=capsys)
    assert code == 1
    assert ("rank 0: Encounter error 'The value updated is not the same shape as the original. "
            "Updated: (256, 72), original: (256, 80)' for parameter "
            "'transformer.layers.0.attention.qkv.weight' (WeightOnlyGroupwiseQuantColumnLinear / "
            "WeightOnlyGroupwiseQuantRowLinear)") in one_line(err)


def test_modelopt_fp8_export_passes(tmp_path, hf):
    from quantize.calibrate import calibrate

    model = copy.deepcopy(hf("llama")[1])
    spec = QuantSpec.create("FP8", kv_cache_dtype="fp8", **CALIB)
    calibrate(model, spec, TEXT, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        result = check_dir(modelopt_export(model, tmp_path / f"tp{tp}", tp))
        assert result.exit_code == 0 and not result.findings, result.summary()


# --- the rule table itself ----------------------------------------------------------------------

def test_declared_awq_qkv_is_padded_as_issue_28_reads_it():
    """The bundled llama (SmolLM2 padded to 12 / 4 heads) at tp 2, AWQ group 64: qkv's full input
    576 pads to 640 (max(64, 64) * 2 = 128), so TensorRT-LLM declares [640, 640 / 4] per rank."""
    config = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 576,
              "num_hidden_layers": 1, "num_attention_heads": 12, "num_key_value_heads": 4,
              "head_size": 64, "intermediate_size": 1536, "vocab_size": 49152,
              "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1},
              "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 64, "pre_quant_scale": True,
                               "exclude_modules": ["lm_head"]}}
    d = declared_rank(config, 1)
    qkv = "transformer.layers.0.attention.qkv"
    assert d[qkv + ".weight"].shape == (640, 160)
    assert d[qkv + ".weights_scaling_factor"].shape == (10, 640)
    assert d[qkv + ".prequant_scaling_factor"].shape == (1, 640)
    assert d["transformer.layers.0.mlp.proj.weight"].shape == (768, 640 // 4)  # in 1536/2, out 640
    assert d["lm_head.weight"].shape == (24576, 576)  # excluded: float
    config["quantization"] = {"quant_algo": "W8A16", "exclude_modules": None}
    d = declared_rank(config, 0)  # weight-only: multiple 64 * tp = 128
    assert d[qkv + ".weight"].shape == (640, 640) and d[qkv + ".weight"].dtype == "int8"
    assert d[qkv + ".per_channel_scale"].shape == (640,)


# --- --gpu, --numerics, the pipeline ------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_ckpt(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    spec = QuantSpec.create("FP8", **CALIB)
    convert_checkpoint(hf("llama")[0], root / "ckpt", tp=1, dtype="float16", progress=False,
                       quant=spec, calibration=CalibrationRun(
                           store=root / "calibration", temporary=True, device="cpu",
                           calib_text=TEXT, tokenizer=byte_tokenizer))
    return root / "ckpt"


def test_gpu_generation_refusals(fp8_ckpt, capsys):
    code, out, _ = run(fp8_ckpt, "--gpu", "H100", capsys=capsys)
    assert code == 0 and one_line(out).startswith("check: PASS")
    code, _, err = run(fp8_ckpt, "--gpu", "a100", capsys=capsys)
    assert code == 1
    assert one_line(err).endswith(": on a100 (SM 80): FP8 GEMMs need Ada / Hopper (SM 89) or newer "
                                  "(TensorRT-LLM support matrix; modelopt support matrix)")
    code, _, err = run(fp8_ckpt, "--gpu", "sm_75", capsys=capsys)
    assert code == 1 and ": on sm_75 (SM 75): FP8 GEMMs" in err
    code, _, err = run(fp8_ckpt, "--gpu", "k80", capsys=capsys)
    assert code == 2 and "--gpu 'k80': unknown GPU; give sm_XX (e.g. sm_90) or one of" in err


def test_gpu_rules_per_format():
    from check.gpu import refusals

    def what(algo, kv=None, moe=False, sm=100):
        config = {"quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv}}
        if moe:
            config["moe"] = {"num_experts": 8}
        return [w for w, _ in refusals(config, sm)]

    assert what("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", sm=100) == [
        "SmoothQuant (INT8) engines are refused on Blackwell (SM 100) and newer"]
    assert what("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", sm=90) == []
    assert what("W4A16_AWQ", "INT8", sm=120) == [
        "INT4 AWQ engines are refused on Blackwell (SM 100) and newer",
        "an INT8 KV cache is refused on Blackwell (SM 100) and newer"]
    assert what("FP8", moe=True, sm=86) == ["FP8 GEMMs need Ada / Hopper (SM 89) or newer",
                                            "FP8 mixture of experts needs SM 89 or newer"]
    assert what("W8A16", sm=70) == [] and what(None, "FP8", sm=89) == []


def test_numerics_runs_the_reference_reader(float_ckpt, hf, capsys):
    code, out, _ = run(float_ckpt, "--numerics", hf("llama")[0], capsys=capsys)
    line = one_line(out)
    assert code == 0 and line.startswith(f"check: PASS {float_ckpt}")
    assert f"; numerics: PASS {float_ckpt}: dtype float16 tp 2 pp 1" in line


def test_pipeline_checks_before_engines(tmp_path, float_ckpt, capsys):
    """--from-checkpoint: a checkpoint TensorRT-LLM would not load stops before any engine."""
    d = broken(float_ckpt, tmp_path, lambda t: t.pop(QKV))
    code = main(["--from-checkpoint", str(d), "--output", str(tmp_path / "out"),
                 "--triton-target", "none"])
    out, err = capsys.readouterr()
    assert code == 1
    assert one_line(err).startswith(f"build_engine: error: check: FAIL {d}: ") and "engines:" not in out
    assert not (tmp_path / "out" / "engines").exists()
