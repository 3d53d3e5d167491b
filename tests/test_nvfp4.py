"""NVFP4 (--nvfp4): the converter's checkpoint equals nvidia-modelopt 0.47's
export_tensorrt_llm_checkpoint of the same model calibrated with NVFP4_DEFAULT_CFG (every tensor of
every rank, bit for bit, tp 1 and 2); the format's arithmetic equals modelopt's NVFP4QTensor and
TensorRT-LLM's block-scale interleave (restated from its CUDA index formula); the reader
simulates it; ``check`` passes its checkpoints."""
from __future__ import annotations

import pytest
import torch

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from quantize.recipes.nvfp4 import weights as W
from test_quantize_convert import assert_same_checkpoint, lw, modelopt_export, spec_for


@pytest.mark.parametrize("kv", [None, "fp8"], ids=["nvfp4", "nvfp4_kv_fp8"])
def test_nvfp4_checkpoint_equals_modelopt_export(tmp_path, calib_text, kv):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **TINY).float().eval()
    spec = spec_for("NVFP4", kv)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (1, 2):
        ours = tmp_path / f"ours_tp{tp}"
        config = convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False,
                                    quant=spec, calibration=lw(tmp_path, calib_text))
        assert config["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": kv and "FP8",
                                          "group_size": 16, "exclude_modules": ["lm_head"]}
        assert_same_checkpoint(ours, modelopt_export(model, tmp_path / f"modelopt_tp{tp}", tp))


def test_kv_heads_duplicated_across_ranks_equal_modelopt_export(tmp_path, calib_text):
    """tp 4 over 2 kv heads: k/v rows (packed bytes and block scales) duplicated per head as
    modelopt's dup_kv_weight does, the 0-dim globals replicated."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, **dict(TINY, num_key_value_heads=2)).float().eval()
    spec = spec_for("NVFP4")
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    convert_checkpoint(hf_dir, tmp_path / "ours", tp=4, dtype="float16", progress=False,
                       quant=spec, calibration=lw(tmp_path, calib_text))
    assert_same_checkpoint(tmp_path / "ours", modelopt_export(model, tmp_path / "modelopt", 4))


# ---------------------------------------------------------------------------------------------
# The arithmetic: ours vs modelopt's NVFP4QTensor, the reader's vs TensorRT-LLM's formulas
# ---------------------------------------------------------------------------------------------


def test_weight_arithmetic_equals_modelopt_nvfp4qtensor():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.05
    w[3, :16] = 0  # an all-zero block: scale 1.0
    w[5, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6] * 2) / 6 * w.abs().max()
    wsf2 = w.abs().amax().float() / (6 * 448)
    ref_scales, _ = NVFP4QTensor.get_weights_scaling_factor(w, 16, wsf2)
    scales = W.block_scales(w, wsf2)
    assert torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))
    packed = W.quantize(w, scales, wsf2)
    qt = NVFP4QTensor.quantize(w, 16, ref_scales, wsf2)[0]
    assert torch.equal(packed, qt._quantized_data)
    ref = qt.dequantize(dtype=torch.float32, scale=ref_scales, double_scale=wsf2, block_sizes={-1: 16})
    assert torch.equal(W.dequantize(packed, scales, wsf2), ref)


def test_reader_rounding_and_unpacking_equal_the_converters():
    """The reader's E2M1 (written from the hardware's round-to-nearest-even) equals the
    converter's (modelopt's bounds), ties included; its unpacking reads the converter's bytes."""
    from verify.reference_nvfp4 import e2m1_round, unpack

    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0,
                      7.0, 0.1, 0.3, 2.2, 4.6, -0.25, -0.75, -1.75, -3.5, -5.0, -5.5])
    x = torch.cat([x, torch.randn(38) * 3])
    codes = W.e2m1_codes(x)
    packed = ((codes[1::2] << 4) | codes[0::2]).reshape(1, -1)
    assert torch.equal(unpack(packed).reshape(-1).float(), e2m1_round(x).float())
    assert torch.equal(W.unpack(packed).reshape(-1), unpack(packed).reshape(-1).float())


def _offset_loop(rows: int, cols: int) -> list[tuple[int, int, int]]:
    """get_sf_out_offset_128x4 in the form taking numCols in ELEMENTS (SF_VEC_SIZE * 4 = 64 per
    k tile), restated one element at a time (a test double of TensorRT-LLM's CUDA kernel)."""
    out = []
    num_cols_elems = cols * 16
    k_tiles = (num_cols_elems + 63) // 64
    for m in range(rows):
        for k in range(cols):
            inner_k, inner_m, outer_m, k_tile, m_tile = k % 4, (m % 128) // 32, m % 32, k // 4, m // 128
            off = m_tile * k_tiles * 512 + k_tile * 512 + outer_m * 16 + inner_m * 4 + inner_k
            out.append((m, k, off))
    return out


@pytest.mark.parametrize("rows,cols", [(256, 16), (300, 10), (64, 6)])
def test_interleaved_block_scales_follow_trtllm_offsets(rows, cols):
    from verify.reference_nvfp4 import interleave, scales_from_interleaved

    scales = (torch.rand(rows, cols) * 100 + 0.01).to(torch.float8_e4m3fn)
    ours = W.interleave_block_scales(scales)
    nrows, ncols = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert ours.shape == (nrows, ncols) and ours.dtype == torch.float8_e4m3fn
    flat = ours.view(torch.uint8).reshape(-1)
    src = scales.view(torch.uint8)
    for m, k, off in _offset_loop(rows, cols):
        assert flat[off] == src[m, k], (m, k, off)
    assert int((flat != 0).sum()) <= rows * cols  # the padding is zero
    assert torch.equal(interleave(scales).view(torch.uint8), ours.view(torch.uint8))
    back = scales_from_interleaved(ours, rows, cols)
    assert torch.equal(back.view(torch.uint8), src)


# ---------------------------------------------------------------------------------------------
# The reader on modelopt's own NVFP4 export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(calib_text, tmp_path_factory):
    """(float model, calibrated model, {tp: modelopt's checkpoint}). modelopt's NVFP4 fake-quant
    forward needs CUDA (tensor_quant: "amax must be a CUDA tensor for dynamic block
    quantization"), so the whole-model reference is the float model and the per-linear one
    modelopt's NVFP4QTensor applied to the captured input."""
    import copy

    from examples.tiny import make_tiny_model
    from test_reference_quant import export

    root = tmp_path_factory.mktemp("nvfp4_reader")
    model = make_tiny_model(root / "hf", **TINY).float().eval()
    q = calibrate(copy.deepcopy(model), spec_for("NVFP4"), calib_text, tokenizer=byte_tokenizer,
                  progress=False)
    return model, q, {tp: export(q, root / f"tp{tp}", tp)[0] for tp in (1, 2)}


def _ids(text):
    return torch.tensor([byte_tokenizer(text[5000:5064]), byte_tokenizer(text[9000:9064])])


def test_reader_on_modelopt_export_tp1_equals_tp2_and_tracks_the_float_model(exported, calib_text,
                                                                              tmp_path):
    from safetensors.torch import load_file, save_file

    from verify.reference import ReferenceModel, compare_with_hf

    model, _, exports = exported
    ids = _ids(calib_text)
    a = ReferenceModel(exports[1]).forward(ids)
    b = ReferenceModel(exports[2]).forward(ids)
    assert float((a - b).norm() / a.norm()) < 1e-3
    r = compare_with_hf(exports[1], model, input_ids=ids)
    print(f"\nNVFP4 reader vs float: rel err {r['rel_err']:.3e}, argmax {r['argmax_agreement']:.3f}")
    # measured 0.40 / 0.37: 4-bit weights and activations on a random 2-layer model (the kernel
    # itself equals modelopt's NVFP4QTensor to 2e-7 per linear, the test below)
    assert 0.05 < r["rel_err"] < 0.6 and r["argmax_agreement"] >= 0.25, r
    # a checkpoint with the nibbles of every byte swapped reads as a different model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((exports[1] / "config.json").read_text())
    t = load_file(exports[1] / "rank0.safetensors")
    t = {k: ((v << 4) | (v >> 4)) if v.dtype == torch.uint8 else v for k, v in t.items()}
    save_file(t, bad / "rank0.safetensors")
    assert compare_with_hf(bad, model, input_ids=ids)["rel_err"] > 2 * r["rel_err"]


def _modelopt_fake_linear(x, params):
    """x -> y through modelopt's NVFP4QTensor: the input quantized and dequantized in blocks of
    16 with the checkpoint's activation global scale, the weight dequantized from its tensors."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    a_global = params["activation_scaling_factor"].float()
    x2 = x.reshape(-1, x.shape[-1]).float()
    xq, xs, _ = NVFP4QTensor.quantize(x2, 16, weights_scaling_factor_2=a_global)
    xd = xq.dequantize(dtype=torch.float32, scale=xs, double_scale=a_global, block_sizes={-1: 16})
    w = params["weight"]
    wq = NVFP4QTensor((w.shape[0], w.shape[1] * 2), torch.float32, w)
    wd = wq.dequantize(dtype=torch.float32, scale=params["weights_scaling_factor"],
                       double_scale=params["weights_scaling_factor_2"].float(), block_sizes={-1: 16})
    return (xd @ wd.t()).reshape(*x.shape[:-1], -1)


def test_single_linears_match_modelopt_nvfp4_qtensor(exported, calib_text):
    """Every linear of layer 0 (tp 1): the reader's kernel on the checkpoint's tensors vs
    modelopt's NVFP4QTensor fake quantization of the same captured input."""
    import json

    from safetensors.torch import load_file

    from verify.reference import LINEAR_KERNELS, QuantSpec as ReaderSpec

    model, _, exports = exported
    spec = ReaderSpec.from_config(json.loads((exports[1] / "config.json").read_text()))
    tensors = load_file(exports[1] / "rank0.safetensors")
    seen = {}
    layer = model.model.layers[0]
    names = {"self_attn.o_proj": "attention.dense", "mlp.down_proj": "mlp.proj",
             "mlp.up_proj": "mlp.fc", "mlp.gate_proj": "mlp.gate"}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n in names]
    try:
        with torch.no_grad():
            model(input_ids=_ids(calib_text))
    finally:
        for h in hooks:
            h.remove()
    for hf_name, trt_name in names.items():
        x = seen[hf_name]
        prefix = f"transformer.layers.0.{trt_name}."
        params = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        got = LINEAR_KERNELS["NVFP4"](x, params, spec)
        want = _modelopt_fake_linear(x, params)
        rel = float((got - want).norm() / want.norm())
        print(f"\nNVFP4 {hf_name}: rel err vs NVFP4QTensor {rel:.2e}")
        assert rel < 1e-5, (hf_name, rel)


# ---------------------------------------------------------------------------------------------
# build_engine check: TensorRT-LLM 1.2's FP4Linear after preprocess_weights; the GPU rule
# ---------------------------------------------------------------------------------------------


def test_checkpoints_pass_check_at_tp1_and_tp2_and_modelopts_export_too(tmp_path, calib_text,
                                                                         exported):
    from check import check_dir
    from examples.tiny import make_tiny_model

    spec = spec_for("NVFP4", "fp8")
    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, **TINY)
    store = lw(tmp_path, calib_text)
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        convert_checkpoint(hf_dir, out, tp=tp, dtype="float16", progress=False, quant=spec,
                           calibration=store)
        result = check_dir(out)
        assert result.exit_code == 0 and not result.findings, result.summary()
    for tp, ckpt in exported[2].items():
        result = check_dir(ckpt)
        assert result.exit_code == 0 and not result.findings, result.summary()


def test_check_declares_fp4linear_and_the_preprocessed_names():
    from check.declared import declared_rank
    from check.preprocess import preprocess
    from check.formats import scheme_for

    config = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 576,
              "num_hidden_layers": 1, "num_attention_heads": 12, "num_key_value_heads": 4,
              "head_size": 64, "intermediate_size": 1536, "vocab_size": 49152,
              "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1},
              "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}
    d = declared_rank(config, 1)
    qkv = "transformer.layers.0.attention.qkv"
    # per rank (6 q + 2 k + 2 v heads) x 64 = 640 rows, 576 inputs: 288 bytes, 36 blocks
    assert d[qkv + ".weight"].shape == (640, 288) and d[qkv + ".weight"].dtype == "uint8"
    assert d[qkv + ".weights_block_scaling_factor"].shape == (640, 36)
    assert d[qkv + ".weights_block_scaling_factor_interleaved"].shape == (640, 36)
    proj = "transformer.layers.0.mlp.proj"  # row: in 768 per rank, out 576
    assert d[proj + ".weights_block_scaling_factor_interleaved"].shape == (640, 48)
    assert d[proj + ".alpha"].shape == (1,) and d["lm_head.weight"].dtype == "float16"
    header = {proj + ".weight": ((576, 384), "uint8"),
              proj + ".weights_scaling_factor": ((576, 48), "float8_e4m3fn"),
              proj + ".weights_scaling_factor_2": ((), "float32"),
              proj + ".activation_scaling_factor": ((), "float32")}
    got, err = preprocess(header, config, scheme_for("NVFP4"))
    assert err is None and got == {
        proj + ".weight": ((576, 384), "uint8"),
        proj + ".weights_block_scaling_factor": ((576, 48), "float8_e4m3fn"),
        proj + ".weights_block_scaling_factor_interleaved": ((640, 48), "float8_e4m3fn"),
        proj + ".weights_global_scaling_factor": ((), "float32"),
        proj + ".activation_global_scaling_factor": ((), "float32"),
        proj + ".alpha": ((), "float32")}


def test_gpu_rule_nvfp4_needs_blackwell():
    from check.gpu import refusals

    def what(kv, sm):
        return [w for w, _ in refusals({"quantization": {"quant_algo": "NVFP4",
                                                         "kv_cache_quant_algo": kv}}, sm)]

    assert what(None, 90) == ["NVFP4 needs Blackwell (SM 100) or newer"]
    assert what("FP8", 100) == [] and what(None, 120) == []


# ---------------------------------------------------------------------------------------------
# Flags, refusals (one line, exit 2, nothing written) and the CLI with its quality gate
# ---------------------------------------------------------------------------------------------


def test_flag_and_refusals():
    import argparse

    from common.errors import UserError
    from quantize.flags import add_quant_arguments
    from quantize.formats import QuantSpec

    ap = argparse.ArgumentParser()
    add_quant_arguments(ap)
    spec = QuantSpec.from_args(ap.parse_args(["--nvfp4", "--kv-cache-dtype", "fp8"]))
    assert (spec.quant_algo, spec.kv_cache_quant_algo, spec.name) == ("NVFP4", "FP8",
                                                                      "NVFP4 + FP8 KV cache")
    assert spec.is_max_calibrated and spec.modelopt_config()["algorithm"] == "max"
    assert "nvfp4" not in vars(ap.parse_args([]))  # build.json of other runs unchanged
    with pytest.raises(UserError) as e:
        QuantSpec.from_args(ap.parse_args(["--nvfp4", "--kv-cache-dtype", "int8"]))
    assert str(e.value) == ("--nvfp4 with --kv-cache-dtype int8 is not supported: NVFP4 needs "
                            "Blackwell (SM 100) and TensorRT-LLM 1.2 refuses an INT8 KV cache "
                            "there; use --kv-cache-dtype fp8")
    with pytest.raises(UserError, match="^choose one weight quantization format, got --fp8 and --nvfp4"):
        QuantSpec.from_args(ap.parse_args(["--nvfp4", "--fp8"]))
    with pytest.raises(UserError) as e:
        spec.format.check_linear_shapes(spec, {"attention.dense": 72}, {})
    assert str(e.value) == ("--nvfp4: attention.dense has 72 input features per rank, not a "
                            "multiple of the NVFP4 block size 16 (TensorRT-LLM's FP4Linear asserts "
                            "it); choose another --tp or format")


@pytest.mark.parametrize("family,extra,message", [
    ("qwen2", [], "--nvfp4 engines are written for Llama-family and Gemma 2 / 3 models "
                  "(LlamaForCausalLM, MistralForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM) "
                  "only, not Qwen2ForCausalLM: its NVFP4 tensors are not tested "
                  "against modelopt 0.47's export here; use --fp8 or --awq"),
    ("mixtral", [], "--nvfp4 is not supported for mixture-of-experts models yet (its expert tensors "
                    "are not written here); use --fp8 or --awq"),
    ("llama", ["--tp", "4"], "--nvfp4: mlp.proj has 40 input features per rank, not a "
                             "multiple of the NVFP4 block size 16"),
])
def test_cli_refusals_exit_2_before_any_work(tmp_path, tiny_model, capsys, family, extra, message):
    hf_dir, _ = tiny_model(family, **({"hidden_size": 128, "num_attention_heads": 4,
                                       "num_key_value_heads": 4, "head_dim": 32}
                                      if extra == ["--tp", "4"] else {}))
    out = tmp_path / "out"
    rc = main_cli(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                   "--no-progress", "--nvfp4", *extra])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines()
             if ln.startswith("build_engine: error:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("build_engine: error: " + message), lines
    assert not out.exists()


def main_cli(argv):
    from builders.cli import main

    return main(argv)


@pytest.mark.slow  # the whole CLI: calibration, checkpoint, check, quality gate
def test_cli_build_calibrates_checks_and_gates_quality(tmp_path, tiny_model, capsys):
    """--nvfp4 end to end on a tiny model with a real tokenizer: calibrated layer by layer, the
    checkpoint passes check, the quality gate measures it through the NVFP4 reader kernel."""
    import json
    import shutil
    from pathlib import Path

    hf_dir, _ = tiny_model()
    for f in (Path(__file__).resolve().parent / "golden" / "tokenizer").iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    assert main_cli(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                     "--no-progress", "--tp", "2", "--nvfp4", "--kv-cache-dtype", "fp8",
                     "--calib-size", "4", "--calib-seq-len", "64",
                     "--max-ppl-increase", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "quality gate (NVFP4 + FP8 KV cache)" in printed, printed
    assert f"check: PASS {out / 'checkpoint.partial'}: LlamaForCausalLM, float16 NVFP4" in printed
    record = json.loads((out / "build.json").read_text())
    assert record["options"]["nvfp4"] is True
    assert record["options"]["quantization"]["quality_gate"]["passed"] is True


# ---------------------------------------------------------------------------------------------
# --target pytorch: modelopt's unified NVFP4 checkpoint (export_hf_checkpoint)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # three calibrations and four checkpoints per case (~20 s idle)
@pytest.mark.parametrize("kv", [None, "fp8"], ids=["nvfp4", "nvfp4_kv_fp8"])
def test_unified_checkpoint_equals_export_hf_checkpoint(tmp_path, calib_text, kv):
    """Whole-model (calibrated in memory) and layer by layer from the calibration store: both
    equal modelopt 0.47's export_hf_checkpoint tensor for tensor, with its hf_quant_config.json
    and quantization_config."""
    from quantize.run import CalibrationRun
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint as same_unified
    from test_pytorch_target import make_model, modelopt_unified

    hf_dir, model = make_model(tmp_path)
    spec = spec_for("NVFP4", kv)
    assert spec.format.unified_layerwise(spec)
    run = CalibrationRun(store=tmp_path / "calibration", device="cpu", calib_text=calib_text,
                         tokenizer=byte_tokenizer)
    write_unified_checkpoint(hf_dir, tmp_path / "store", spec, calibration=run, progress=False)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, tmp_path / "whole", spec, calibrated_model=model, progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    for ours in ("store", "whole"):
        tensors = same_unified(tmp_path / ours, theirs)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    if kv is not None:  # modelopt's TensorRT-LLM export clamps FP8 KV scales to >= 1, not the unified
        return
    # the reader runs the unified checkpoint with the same NVFP4 kernel: it reads as the float32
    # TensorRT-LLM checkpoint of the same calibration does
    from verify.reference import ReferenceModel

    trt = tmp_path / "trtllm"
    convert_checkpoint(hf_dir, trt, tp=1, dtype="float32", progress=False, quant=spec,
                       calibration=run)
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5064])])
    a, b = ReferenceModel(trt).forward(ids), ReferenceModel(tmp_path / "store").forward(ids)
    print(f"\nNVFP4 unified vs TensorRT-LLM checkpoint through the reader: "
          f"{float((a - b).norm() / a.norm()):.2e}")
    assert float((a - b).norm() / a.norm()) < 1e-4
