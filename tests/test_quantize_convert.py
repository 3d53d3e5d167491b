"""Quantized checkpoints from the converter (and build_engine's quantization flags).

Calibrated formats: our checkpoint equals nvidia-modelopt 0.47's export_tensorrt_llm_checkpoint
of the same calibrated model, every tensor of every rank (names, shapes, dtypes, values bit for
bit), with the same ``quantization`` block, at tp 1 and 2 on tiny models and SmoothQuant at tp 3 on
SmolLM2. Weight-only formats: the float checkpoint's bytes with the weight-only quant_algo. Bad
inputs: one line, exit 2, nothing written.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from builders.cli import main
from convert_helper import convert_checkpoint
from quantize.calibrate import calibrate
from quantize.formats import TRTLLM_DEFAULT_EXCLUDE_MODULES, QuantSpec
from quantize.run import CalibrationRun
from quant_common import TINY, byte_tokenizer

# config keys where this project deliberately differs from modelopt's export (see
# tests/test_convert_vs_modelopt.py): TensorRT-LLM's own converter's logits_dtype and extra keys
CONFIG_KEYS_DIFFERENT_BY_DESIGN = {"logits_dtype", "rank", "residual_mlp", "rmsnorm", "bias",
                                   "decoder", "lm_head_bias", "producer", "rotary_scaling",
                                   "tie_word_embeddings", "attn_bias", "mlp_bias"}


def spec_for(algo, kv=None, block=None, **calib):
    return QuantSpec.create(algo, kv_cache_dtype=kv, awq_block_size=block,
                            **({"calib_size": 4, "calib_seq_len": 64, "calib_batch_size": 2}
                               | calib))


def lw(tmp_path, text, tokenizer=byte_tokenizer):
    """The converter's own calibration (layer by layer from the safetensors, the default) on
    ``text``; the tests compare its checkpoint with modelopt's export of a whole-model
    ``mtq.quantize`` of the same model on the same text."""
    return CalibrationRun(store=tmp_path / "calibration", temporary=True, device="cpu",
                          calib_text=text, tokenizer=tokenizer)


def modelopt_export(model, out_dir, tp, dtype=torch.float16):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(model)  # the export re-smooths / pads the model in place
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type="llama", dtype=dtype,
                                   export_dir=out_dir, inference_tensor_parallel=tp)
    return out_dir


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def assert_same_checkpoint(ours_dir, theirs_dir, *, quantization_by_design=False,
                           extra_config_keys=frozenset()):
    """Every tensor of every rank bit-identical; config.json equal but for the keys that differ by
    design (and ``extra_config_keys``, and the ``quantization`` block when
    ``quantization_by_design``)."""
    ours_cfg = json.loads((ours_dir / "config.json").read_text())
    theirs_cfg = json.loads((theirs_dir / "config.json").read_text())
    if not quantization_by_design:
        assert list(ours_cfg["quantization"].items()) == list(theirs_cfg["quantization"].items())
    for key in set(ours_cfg) | set(theirs_cfg):
        if key not in CONFIG_KEYS_DIFFERENT_BY_DESIGN | {"quantization"} | extra_config_keys:
            assert ours_cfg.get(key) == theirs_cfg.get(key), key
    world = theirs_cfg["mapping"]["world_size"]
    for r in range(world):
        ours = load_file(ours_dir / f"rank{r}.safetensors")
        theirs = load_file(theirs_dir / f"rank{r}.safetensors")
        assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
        for name, b in theirs.items():
            a = ours[name]
            assert (a.shape, a.dtype) == (b.shape, b.dtype), (r, name)
            assert torch.equal(_bits(a), _bits(b)), f"rank{r} {name}: values differ"


@pytest.mark.parametrize("algo,kv,block,overrides", [
    ("W8A8_SQ_PER_CHANNEL", None, None, {}),
    ("W8A8_SQ_PER_CHANNEL", "int8", None, {}),
    ("FP8", "fp8", None, {}),
    ("W4A16_AWQ", None, None, {}),
    ("W4A16_AWQ", "fp8", 64, {"intermediate_size": 640}),
    (None, "int8", None, {}),
], ids=["sq", "sq_kv_int8", "fp8_kv_fp8", "awq128", "awq64_kv_fp8", "kv_int8_only"])
def test_calibrated_checkpoint_equals_modelopt_export(tmp_path, calib_text, algo, kv, block,
                                                      overrides):
    from examples.tiny import make_tiny_model

    cfg = dict(TINY, **overrides)
    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **cfg).float().eval()
    spec = spec_for(algo, kv, block)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        config = convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False,
                                    quant=spec, calibration=lw(tmp_path, calib_text))
        assert config["quantization"] == spec.to_trtllm_quantization()
        assert_same_checkpoint(ours, modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp))


@pytest.mark.parametrize("algo,kv,block", [("W8A8_SQ_PER_CHANNEL", "int8", None),
                                           ("W4A16_AWQ", "fp8", 64)], ids=["sq_kv_int8", "awq64"])
def test_bfloat16_model_equals_modelopt_bfloat16_export(tmp_path, calib_text, algo, kv, block):
    """A bf16 source with --dtype auto: the checkpoint is bf16 (norms, embedding, lm_head,
    prequant scales) and still equals modelopt's bf16 export tensor for tensor."""
    from examples.tiny import make_tiny_model

    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, dtype=torch.bfloat16, **TINY)
    # the reference loads the bf16 files as the whole-model path did (from_pretrained in fp32):
    # an in-memory .to(bf16).float() would also round the rotary inv_freq buffer to bf16
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    spec = spec_for(algo, kv, block)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        config = convert_checkpoint(hf_dir, ours, tp=tp, progress=False, quant=spec,
                                    calibration=lw(tmp_path, calib_text))
        assert config["dtype"] == "bfloat16"
        assert_same_checkpoint(ours, modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp,
                                                     dtype=torch.bfloat16))


@pytest.mark.parametrize("algo,kv", [("W8A8_SQ_PER_CHANNEL", "int8"), ("W4A16_AWQ", "fp8")],
                         ids=["sq_kv_int8", "awq128_kv_fp8"])
def test_qwen2_with_qkv_bias_equals_modelopt_export(tmp_path, calib_text, algo, kv):
    """Qwen2 (q/k/v biases, modelopt decoder_type "qwen"): quantized qkv with its float bias per
    rank, every tensor as modelopt writes it. config.json: our Qwen2 keys come from TensorRT-LLM's
    own converter (qwen_type, seq_length), which modelopt's manual config path does not write."""
    from examples.tiny import make_tiny_model
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, family="qwen2", **TINY).float().eval()
    spec = spec_for(algo, kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False, quant=spec,
                           calibration=lw(tmp_path, calib_text))
        assert "transformer.layers.0.attention.qkv.bias" in load_file(ours / "rank0.safetensors")
        m = copy.deepcopy(model)
        m.config.rope_theta = m.config.rope_parameters["rope_theta"]
        theirs = tmp_path / f"modelopt_tp{tp}"
        export_tensorrt_llm_checkpoint(m, decoder_type="qwen", dtype=torch.float16,
                                       export_dir=theirs, inference_tensor_parallel=tp)
        for key in ("qwen_type", "seq_length"):
            assert key in json.loads((ours / "config.json").read_text())
        assert_same_checkpoint(ours, theirs, extra_config_keys={"qwen_type", "seq_length"})


@pytest.mark.parametrize("algo,kv,block", [("FP8", "fp8", None), ("W4A16_AWQ", "int8", 64)],
                         ids=["fp8_kv_fp8", "awq64_kv_int8"])
def test_kv_heads_duplicated_across_ranks_equal_modelopt_export(tmp_path, calib_text, algo, kv,
                                                                 block):
    """2 kv heads over tp 4: each rank gets a copy of its kv head's weights and scales (modelopt's
    dup_kv_weight), for FP8 (scalar scales) and AWQ (packed int4 rows, group scales)."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **dict(TINY, num_key_value_heads=2)).float().eval()
    spec = spec_for(algo, kv, block)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    ours = tmp_path / "ours"
    convert_checkpoint(hf_dir, ours, tp=4, dtype="float16", progress=False, quant=spec,
                       calibration=lw(tmp_path, calib_text))
    assert_same_checkpoint(ours, modelopt_export(model, tmp_path / "modelopt", 4))


def test_smoothquant_refuses_more_ranks_than_kv_heads(tmp_path, tiny_model, capsys):
    """modelopt cannot duplicate SmoothQuant's per-channel k/v scales: one line, exit 2, before
    calibration, nothing written."""
    hf_dir, _ = tiny_model(**dict(TINY, num_key_value_heads=2))
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
               "--smoothquant", "--tp", "4"])
    assert rc == 2
    assert "--smoothquant with --tp 4 needs at least 4 KV heads (the model has 2)" in \
        _error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("algo,kv,tp", [("W4A16_AWQ", "fp8", 1), ("W8A8_SQ_PER_CHANNEL", "int8", 2)],
                         ids=["awq128_kv_fp8_tp1_pp2", "sq_kv_int8_tp2_pp2"])
def test_pipeline_parallel_equals_modelopt_pp_export(tmp_path, calib_text, algo, kv, tp):
    """pp 2 over 4 layers: every rank equals modelopt's export with inference_pipeline_parallel
    (stage layers renumbered from 0, embedding on the first stage, ln_f/lm_head on the last, AWQ's
    padded vocabulary)."""
    from examples.tiny import make_tiny_model
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **dict(TINY, num_hidden_layers=4)).float().eval()
    spec = spec_for(algo, kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    ours = tmp_path / "ours"
    convert_checkpoint(hf_dir, ours, tp=tp, pp=2, dtype="float16", progress=False, quant=spec,
                       calibration=lw(tmp_path, calib_text))
    m = copy.deepcopy(model)
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]
    theirs = tmp_path / "modelopt"
    export_tensorrt_llm_checkpoint(m, decoder_type="llama", dtype=torch.float16, export_dir=theirs,
                                   inference_tensor_parallel=tp, inference_pipeline_parallel=2)
    assert_same_checkpoint(ours, theirs)


def test_pipeline_stages_hold_their_layers_renumbered(tmp_path, calib_text):
    """pp 2 x tp 2: stage 1 holds HF layer 1 as its layer 0, with the tp-2 tensors of that layer."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **TINY).float().eval()
    spec = spec_for("FP8")
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    convert_checkpoint(hf_dir, tmp_path / "tp2", tp=2, dtype="float16", progress=False,
                       quant=spec, calibration=lw(tmp_path, calib_text))
    convert_checkpoint(hf_dir, tmp_path / "pp2", tp=2, pp=2, dtype="float16", progress=False,
                       quant=spec, calibration=lw(tmp_path, calib_text))
    for tp_rank in (0, 1):
        flat = load_file(tmp_path / "tp2" / f"rank{tp_rank}.safetensors")
        stage1 = load_file(tmp_path / "pp2" / f"rank{2 + tp_rank}.safetensors")
        assert not any(k.startswith("transformer.layers.1.") for k in stage1)
        for name, t in stage1.items():
            src = name.replace("transformer.layers.0.", "transformer.layers.1.")
            assert torch.equal(_bits(t), _bits(flat[src])), name


@pytest.mark.parametrize("flag,algo", [("--int8-weight-only", "W8A16"),
                                       ("--int4-weight-only", "W4A16")])
def test_weight_only_is_the_float_checkpoint_with_its_quant_algo(tmp_path, tiny_model, flag, algo):
    hf_dir, _ = tiny_model(**TINY)
    assert main(["--model", str(hf_dir), "--output", str(tmp_path / "fp16"), "--tp", "2",
                 "--checkpoint-only", "--no-progress"]) == 0
    assert main(["--model", str(hf_dir), "--output", str(tmp_path / "wo"), "--tp", "2",
                 "--checkpoint-only", "--no-progress", flag]) == 0
    cfg = json.loads((tmp_path / "wo" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": algo, "kv_cache_quant_algo": None,
                                   "exclude_modules": list(TRTLLM_DEFAULT_EXCLUDE_MODULES)}
    for r in (0, 1):
        name = f"rank{r}.safetensors"
        assert (tmp_path / "wo" / "checkpoint" / name).read_bytes() == \
            (tmp_path / "fp16" / "checkpoint" / name).read_bytes()


@pytest.mark.parametrize("algo", ["W8A16", "W4A16"])
def test_weight_only_with_kv_cache_is_float_weights_plus_modelopt_kv_scales(tmp_path, calib_text,
                                                                            algo):
    """Weight-only + INT8 KV cache: only the KV quantizers are calibrated; every tensor equals
    modelopt's export of that calibrated model (float linears, KV-cache scales), and the
    quantization block is TensorRT-LLM's weight-only one with the KV algorithm."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **TINY).float().eval()
    spec = spec_for(algo, "int8")
    assert spec.needs_calibration
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False, quant=spec,
                           calibration=lw(tmp_path, calib_text))
        theirs = modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp)
        assert_same_checkpoint(ours, theirs, quantization_by_design=True)
        cfg = json.loads((ours / "config.json").read_text())
        assert cfg["quantization"] == {"quant_algo": algo, "kv_cache_quant_algo": "INT8",
                                       "exclude_modules": list(TRTLLM_DEFAULT_EXCLUDE_MODULES)}
        rank0 = load_file(ours / "rank0.safetensors")
        assert rank0["transformer.layers.0.attention.qkv.weight"].dtype == torch.float16
        assert rank0["transformer.layers.0.attention.kv_cache_scaling_factor"].dtype == torch.float32


@pytest.mark.parametrize("shape,flag,needle", [
    # 5 heads of 32: qkv has 15 x 32 = 480 outputs, not a multiple of 64 (x tp 1)
    (dict(hidden_size=160, num_attention_heads=5, num_key_value_heads=5, intermediate_size=320),
     "--int8-weight-only", "W8A16: TensorRT-LLM's WeightOnlyQuantLinear pads a linear's input and "
     "output features to a multiple of 64 x tp = 64 and no activation (tensorrt_llm/quantization/"
     "layers.py): attention.qkv's 480 output features would not meet the model's"),
    # head_dim 16, one kv head: qkv has (8 + 2) x 16 = 160 outputs
    (dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1, intermediate_size=256),
     "--int4-weight-only", "W4A16: TensorRT-LLM's WeightOnlyQuantLinear pads a linear's input and "
     "output features to a multiple of 64 x tp = 64"),
    # AWQ's linears pad the same way (refused before calibration)
    (dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1, intermediate_size=256),
     "--awq", "W4A16_AWQ: TensorRT-LLM's WeightOnlyGroupwiseQuantLinear pads a linear's input and "
     "output features to a multiple of 64 x tp = 64"),
])
def test_weight_only_refuses_shapes_trtllm_would_pad_inexactly(tmp_path, tiny_model, capsys, shape,
                                                               flag, needle):
    """TensorRT-LLM 1.x's weight-only / AWQ linears pad every feature dim to a multiple of 64 (or
    the AWQ group) x tp and no activation: q/k/v features that are not would not meet the
    attention's (tests/test_feature_padding.py has the exact, padded, MLP case)."""
    hf_dir, _ = tiny_model(**dict(TINY, **shape))
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
               flag, *(["--awq-block-size", "64"] if flag == "--awq" else [])])
    assert rc == 2
    assert needle in _error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("first,second", [(None, "W8A16"), ("W8A16", "W4A16"),
                                          ("W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL")])
def test_interrupted_run_is_never_resumed_with_files_of_another_spec(tmp_path, calib_text,
                                                                   monkeypatch, first, second):
    """A .partial left by an interrupted run is reused only by the same float/weight-only
    command; another spec rewrites every rank, and a calibrated run never resumes (a new
    calibration must not be mixed with ranks of an earlier one)."""
    import convert.convert as cc
    from common.interrupt import Interrupted
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **TINY).float().eval()
    specs = {algo: spec_for(algo) if algo else None for algo in (first, second)}
    for spec in specs.values():
        if spec is not None and spec.needs_calibration:
            calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)

    def convert(algo, out):
        return convert_checkpoint(hf_dir, out, tp=2, dtype="float16", progress=False,
                                  quant=specs[algo], calibration=lw(tmp_path, calib_text))

    real, written = cc._write_rank, []

    def stop_at_rank1(model_dir, plan, path, rank, progress, **kw):
        if rank == 1:
            raise KeyboardInterrupt
        return real(model_dir, plan, path, rank, progress, **kw)

    def spy(model_dir, plan, path, rank, progress, **kw):
        written.append(rank)
        return real(model_dir, plan, path, rank, progress, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(cc, "_write_rank", stop_at_rank1)
    with pytest.raises(Interrupted):
        convert(first, out)
    assert (tmp_path / "out.partial" / "rank0.safetensors").is_file()
    monkeypatch.setattr(cc, "_write_rank", spy)
    convert(second, out)
    assert written == [0, 1]
    monkeypatch.setattr(cc, "_write_rank", real)
    convert(second, tmp_path / "fresh")
    for name in ("config.json", "rank0.safetensors", "rank1.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


@pytest.mark.slow  # two modelopt calibrations per case (~10-20 s each on 2 CPU cores)
@pytest.mark.parametrize("argv,algo,kv,block", [
    (["--smoothquant", "--sq-recipe", "modelopt", "--kv-cache-dtype", "int8"], "W8A8_SQ_PER_CHANNEL", "int8", None),
    (["--awq", "--awq-block-size", "64", "--kv-cache-dtype", "fp8"], "W4A16_AWQ", "fp8", 64),
], ids=["sq_kv_int8", "awq64_kv_fp8"])
def test_cli_calibration_equals_modelopt_export_of_an_independent_calibration(
        tmp_path, smollm2_dir, argv, algo, kv, block):
    """The user's path, where build_engine loads and calibrates the model itself (the tests above
    hand the converter a model calibrated once): its checkpoint equals modelopt's export of a
    second, independent calibration of the same model (``calibrate`` loading it and tokenizing the
    default text on its own), every tensor of both tp-2 ranks bit for bit. So calibration on CPU
    is deterministic and the CLI feeds it exactly the samples ``calibrate`` builds. The tiny random
    model borrows SmolLM2's tokenizer (vocab 49152) so that the CLI can read text."""
    import shutil

    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, dtype=torch.float16, **dict(TINY, vocab_size=49152))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, hf_dir / name)
    calib = ["--calib-size", "4", "--calib-seq-len", "64"]
    assert main(["--model", str(hf_dir), "--output", str(tmp_path / "out"), "--tp", "2",
                 "--checkpoint-only", "--no-progress", *argv, *calib]) == 0
    ours = tmp_path / "out" / "checkpoint"
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, awq_block_size=block, calib_size=4,
                            calib_seq_len=64)
    model = calibrate(hf_dir, spec, progress=False)  # loads, tokenizes the default text itself
    assert_same_checkpoint(ours, modelopt_export(model, tmp_path / "modelopt", 2))


@pytest.mark.slow  # real SmolLM2-135M: calibration, modelopt's export, reference reader
def test_smoothquant_tp3_on_smollm2_equals_modelopt_and_verifies(tmp_path, smollm2_dir,
                                                                  shared_text):
    """The headline: SmolLM2-135M (9 heads, 3 kv heads) with --smoothquant at tp 3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verify.reference import compare_with_hf

    spec = spec_for("W8A8_SQ_PER_CHANNEL", calib_size=2, calib_seq_len=32, calib_batch_size=1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    text = shared_text("shakespeare.txt", 20000)
    calibrate(model, spec, text, progress=False)
    ours = tmp_path / "ours"
    convert_checkpoint(smollm2_dir, ours, tp=3, progress=False, quant=spec,
                       calibration=lw(tmp_path, text, AutoTokenizer.from_pretrained(smollm2_dir)))
    assert_same_checkpoint(ours, modelopt_export(model, tmp_path / "modelopt", 3))
    # the reference reader runs our ranks like the engine; its logits follow modelopt's
    # fake-quant model (the calibrated model's own forward), not just the float one
    report = compare_with_hf(ours, model, text="To be, or not to be, that is the question: "
                             "Whether 'tis nobler in the mind to suffer",
                             tokenizer=AutoTokenizer.from_pretrained(smollm2_dir))
    assert report["argmax_agreement"] >= 0.9, report
    assert report["rel_err"] < 0.05, report


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("build_engine: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["--smoothquant", "--awq"], "choose one weight quantization format"),
    (["--fp8", "--int8-weight-only"], "choose one weight quantization format"),
    (["--fp8", "--kv-cache-dtype", "int8"], "--kv-cache-dtype fp8"),
    (["--awq"], "no --tp value keeps them whole: try --awq-block-size 64"),   # SmolLM2: qkv 15 x 64
    (["--smoothquant", "--calib-data", "EMPTY"], "is empty"),
    (["--smoothquant", "--calib-data", "MISSING"], "does not exist"),
    (["--smoothquant", "--tp", "9"], "cannot split this model over tp 9"),
])
def test_bad_quantization_input_is_one_line_exit_2_and_writes_nothing(tmp_path, smollm2_dir,
                                                                      capsys, argv, needle):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = [{"EMPTY": str(tmp_path / "empty.txt"),
             "MISSING": str(tmp_path / "missing.txt")}.get(a, a) for a in argv]
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--output", str(out), "--no-progress", *argv])
    assert rc == 2
    assert needle in _error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "out" / "checkpoint.partial").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--smoothquant"], "calibration needs the model's tokenizer but"),
    (["--int8-weight-only", "--verify"],
     "--verify of a quantized checkpoint (on real text) needs the model's tokenizer but"),
])
def test_model_without_tokenizer_is_refused_before_any_work(tmp_path, tiny_model, capsys, argv,
                                                            needle):
    """Calibration and a quantized --verify read real text: a model directory without a tokenizer
    (the tiny random models have none) is one line, exit 2, nothing written."""
    hf_dir, _ = tiny_model(**TINY)
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
               *argv])
    assert rc == 2
    assert needle in _error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.slow  # real SmolLM2-135M: 8 x 128 calibration tokens and --verify (~1-2 min)
def test_quant_flags_with_from_checkpoint_are_refused(tmp_path, tiny_model, capsys):
    """--from-checkpoint builds an existing checkpoint: a quantization flag there would be silently
    ignored, so it is refused (one line, exit 2, nothing written)."""
    hf_dir, _ = tiny_model(**TINY)
    assert main(["--model", str(hf_dir), "--output", str(tmp_path / "fp16"), "--checkpoint-only",
                 "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    rc = main(["--from-checkpoint", str(tmp_path / "fp16" / "checkpoint"), "--output", str(out),
               "--no-progress", "--int8-weight-only"])
    assert rc == 2
    assert "quantization flags apply when converting with --model" in \
        _error_line(capsys.readouterr().err)
    assert not out.exists()


def test_cli_smoothquant_tp3_with_verify_on_smollm2(tmp_path, smollm2_dir, capsys):
    """The user's command, end to end on CPU, with the default recipe (TensorRT-LLM's
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN, alpha 0.75): calibrate, write 3 ranks, print the recipe and
    the quality gate, check the ranks with the reference reader against the float model on real text
    (exit 0 only when it passes)."""
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--tp", "3", "--smoothquant", "--calib-size", "8",
               "--calib-seq-len", "128", "--output", str(out), "--checkpoint-only", "--verify",
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    algo = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert f"SmoothQuant recipe: TensorRT-LLM {algo} (alpha 0.75): int8 weights per channel, int8 " \
           "activations per token (dynamic)" in text
    (gate,) = [ln for ln in text.splitlines() if ln.startswith("quality gate (")]
    assert "perplexity" in gate and "top-1 agreement" in gate and "held-back calibration text" in gate
    (line,) = [ln for ln in text.splitlines() if ln.startswith("verify: ")]
    assert line.startswith("verify: PASS") and f"{algo} vs the float model" in line
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert (cfg["quantization"]["quant_algo"], cfg["quantization"]["smoothquant_val"]) == (algo, 0.75)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors"]
    manifest = json.loads((out / "build.json").read_text())
    assert manifest["options"]["smoothquant"] == 0.75
    q = manifest["options"]["quantization"]
    assert q["quant_algo"] == algo and q["alphas"] == [0.75] * 30 and algo in q["recipe"]
    assert q["quality_gate"]["passed"] and q["quality_gate"]["increase_pct"] < 5
    t = manifest["stage_timings_s"]
    assert 0 < t["quantized_tensors"] < t["checkpoint"] and t["quality_gate"] > 0
    assert any(ln.startswith("calibration: ") for ln in text.splitlines())


def test_cli_quality_gate_breach_exits_1_and_keeps_nothing(tmp_path, smollm2_dir, capsys):
    """A recipe that hurts SmolLM2 (static per-tensor activations and weights, alpha 1) with
    --max-ppl-increase 2: exit 1, the numbers on stderr, no checkpoint and no output directory left."""
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--output", str(out), "--smoothquant", "1", "--sq-weights",
               "tensor", "--sq-activations", "tensor", "--calib-size", "4", "--calib-seq-len", "64",
               "--max-ppl-increase", "2", "--checkpoint-only", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1, captured.out
    (gate,) = [ln for ln in captured.out.splitlines() if ln.startswith("quality gate (")]
    assert "W8A8_SQ_PER_TENSOR_PLUGIN" in gate and "limit +2%: BREACH" in gate
    assert "the quality gate failed: perplexity +" in captured.err and "nothing was kept" in captured.err
    assert not out.exists()
