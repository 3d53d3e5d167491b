"""--kv-cache-dtype nvfp4: an NVFP4 KV cache where TensorRT-LLM 1.2 takes one, its PyTorch backend
(``--target pytorch``; the engine target refuses it in one line, check/gpu.py). The unified
checkpoint equals nvidia-modelopt 0.47's export_hf_checkpoint of the same model calibrated with
``NVFP4_KV_CFG`` (``k_proj.k_scale`` / ``v_proj.v_scale`` = amax / 448, hf_quant_config.json's
``kv_cache_quant_algo`` "NVFP4", config.json's ``kv_cache_scheme`` "NVFP4"), layer by layer from
the calibration store and whole-model, beside NVFP4 and FP8 weights; the reader's NVFP4 cache
kernel equals modelopt's own fake quantization of the keys and values."""
from __future__ import annotations

import json

import pytest
import torch

from quant_common import byte_tokenizer
from quantize.calibrate import calibrate
from test_quantize_convert import spec_for


@pytest.mark.parametrize("algo", ["NVFP4", pytest.param("FP8", marks=pytest.mark.slow)])
def test_unified_checkpoint_equals_export_hf_checkpoint(tmp_path, calib_text, algo):
    from quantize.run import CalibrationRun
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, make_model, modelopt_unified

    hf_dir, model = make_model(tmp_path)
    spec = spec_for(algo, "nvfp4")
    assert spec.format.unified_layerwise(spec)
    run = CalibrationRun(store=tmp_path / "calibration", device="cpu", calib_text=calib_text,
                         tokenizer=byte_tokenizer)
    write_unified_checkpoint(hf_dir, tmp_path / "store", spec, calibration=run, progress=False)
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    theirs = modelopt_unified(model, tmp_path / "modelopt", torch.float32)
    tensors = assert_same_checkpoint(tmp_path / "store", theirs)
    if algo == "NVFP4":  # whole-model, from the calibrated model in memory
        assert_same_checkpoint(_whole(hf_dir, tmp_path / "whole", spec, model), theirs)
    q = json.loads((tmp_path / "store" / "hf_quant_config.json").read_text())["quantization"]
    assert q["kv_cache_quant_algo"] == "NVFP4"
    cfg = json.loads((tmp_path / "store" / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"] == "NVFP4"
    k_amax = model.model.layers[1].self_attn.k_bmm_quantizer.amax.float()
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.k_scale"], (k_amax / 448).reshape(()))


def _whole(hf_dir, out, spec, model):
    from quantize.unified import write_unified_checkpoint

    write_unified_checkpoint(hf_dir, out, spec, calibrated_model=model, progress=False)
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, calib_text):
    """A tiny Llama (float), a copy calibrated whole-model for NVFP4 + NVFP4 KV, and the unified
    checkpoint of that calibration."""
    import copy

    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import make_model

    root = tmp_path_factory.mktemp("nvfp4kv")
    hf_dir, model = make_model(root)
    q = copy.deepcopy(model)
    spec = spec_for("NVFP4", "nvfp4")
    calibrate(q, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(hf_dir, root / "ckpt", spec, calibrated_model=q, progress=False)
    return model, q, root / "ckpt"


def _modelopt_cache(t, amax):
    """``t`` through modelopt's NVFP4 arithmetic (NVFP4QTensor, blocks of 16 along the last
    dimension) with the global scale its calibrated NVFP4_KV_CFG quantizer uses, amax / (6 * 448)
    (the quantizer itself runs its dynamic block quantization on CUDA only)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    g = amax.float() / (6.0 * 448.0)
    x2 = t.reshape(-1, t.shape[-1]).float()
    xq, xs, _ = NVFP4QTensor.quantize(x2, 16, weights_scaling_factor_2=g)
    return xq.dequantize(dtype=torch.float32, scale=xs, double_scale=g,
                         block_sizes={-1: 16}).reshape(t.shape)


def test_reader_cache_kernel_equals_modelopt_nvfp4(calibrated, calib_text):
    """Layer 0's keys and values laid out as the cache holds them ([batch, kv heads, seq,
    head_dim]; taken from the float model's k_proj / v_proj on a batch, the calibrated copy runs
    NVFP4 on CUDA only): the reader's NVFP4 cache kernel with the checkpoint's k_scale / v_scale
    equals modelopt's NVFP4 quantize-dequantize with the calibrated k/v_bmm_quantizers' global
    scales."""
    from safetensors.torch import load_file

    from verify.reference import KV_CACHE_KERNELS, QuantSpec as ReaderSpec

    model, q, ckpt = calibrated
    attn = model.model.layers[0].self_attn
    seen = {}
    hooks = [getattr(attn, f"{n}_proj").register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o.detach())) for n in "kv"]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([byte_tokenizer(calib_text[7000:7064])]))
    finally:
        for h in hooks:
            h.remove()
    k, v = (seen[n].view(1, 64, -1, 32).transpose(1, 2) for n in "kv")
    quantizers = {n: getattr(q.model.layers[0].self_attn, f"{n}_bmm_quantizer") for n in "kv"}
    t = load_file(ckpt / "model.safetensors")
    params = {"k_cache_scaling_factor": t["model.layers.0.self_attn.k_proj.k_scale"],
              "v_cache_scaling_factor": t["model.layers.0.self_attn.v_proj.v_scale"]}
    assert k.dim() == 4 and k.shape[-1] == 32  # [batch, kv heads, seq, head_dim]
    got = KV_CACHE_KERNELS["NVFP4"](k, v, params, ReaderSpec(None, "NVFP4"))
    for ours, raw, n in zip(got, (k, v), "kv"):
        theirs = _modelopt_cache(raw, quantizers[n].amax)
        rel = float((ours - theirs).norm() / theirs.norm())
        print(f"\nNVFP4 {n} cache: reader vs modelopt rel {rel:.1e}, vs float "
              f"{float((ours - raw).norm() / raw.norm()):.3f}")
        assert rel < 1e-6 and not torch.equal(ours, raw), rel


def test_reader_runs_the_unified_checkpoint(calibrated, calib_text, tmp_path):
    """The reader on the unified checkpoint tracks the float model, and less closely than the
    same checkpoint read without its KV cache quantized (the cache kernel is applied)."""
    from verify.reference import compare_with_hf

    model, _, ckpt = calibrated
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5064]), byte_tokenizer(calib_text[9000:9064])])
    r = compare_with_hf(ckpt, model, input_ids=ids)
    plain = _without_kv(ckpt, tmp_path)
    r0 = compare_with_hf(plain, model, input_ids=ids)
    print(f"\nNVFP4 + NVFP4 KV reader vs float: rel {r['rel_err']:.3f}, argmax "
          f"{r['argmax_agreement']:.3f}; without the KV cache: rel {r0['rel_err']:.3f}")
    assert r["rel_err"] < 0.8 and r["rel_err"] > r0["rel_err"], (r, r0)


def _without_kv(ckpt, tmp_path):
    """A copy of the checkpoint whose JSON declares no quantized KV cache (a test double of the
    same weights with the cache in float)."""
    import shutil

    out = tmp_path / "nokv"
    shutil.copytree(ckpt, out)
    for name in ("hf_quant_config.json", "config.json"):
        d = json.loads((out / name).read_text())
        q = d["quantization"] if name.startswith("hf") else d["quantization_config"]
        q.pop("kv_cache_scheme", None)
        if "kv_cache_quant_algo" in q:
            q["kv_cache_quant_algo"] = None
        (out / name).write_text(json.dumps(d))
    return out


# ---------------------------------------------------------------------------------------------
# Flags and refusals: one line, before any work
# ---------------------------------------------------------------------------------------------


def test_flag_pairs_with_nvfp4_and_fp8_only():
    import argparse

    from common.errors import UserError
    from quantize.flags import add_quant_arguments
    from quantize.formats import QuantSpec

    ap = argparse.ArgumentParser()
    add_quant_arguments(ap)
    for flag, algo in (("--nvfp4", "NVFP4"), ("--fp8", "FP8")):
        spec = QuantSpec.from_args(ap.parse_args([flag, "--kv-cache-dtype", "nvfp4"]))
        assert (spec.quant_algo, spec.kv_cache_quant_algo) == (algo, "NVFP4")
        assert spec.name == f"{algo} + NVFP4 KV cache"
        kv = [e for e in spec.modelopt_config()["quant_cfg"]
              if e.get("quantizer_name") == "*[kv]_bmm_quantizer"]
        assert kv and kv[-1]["cfg"]["num_bits"] == (2, 1) and kv[-1]["cfg"]["block_sizes"][-1] == 16
    for argv, name in ((["--awq"], "--awq"), ([], "the float format"),
                       (["--smoothquant", "--sq-recipe", "modelopt"], "--smoothquant")):
        with pytest.raises(UserError) as e:
            QuantSpec.from_args(ap.parse_args([*argv, "--kv-cache-dtype", "nvfp4"]))
        assert str(e.value) == (
            f"--kv-cache-dtype nvfp4 pairs with --nvfp4 or --fp8 only, not {name}: TensorRT-LLM "
            f"1.2's PyTorch backend loads NVFP4 KV-cache scales in its FP8 and NVFP4 linears only; "
            f"add --nvfp4 or --fp8, or use --kv-cache-dtype fp8")


@pytest.mark.parametrize("extra,message", [
    ([], "build_engine: error: TensorRT-LLM 1.2 takes an NVFP4 KV cache on its PyTorch backend only "
         "(its engine flow's quantization offers an INT8 or FP8 KV cache): use --target pytorch, "
         "or --kv-cache-dtype fp8 ("),
    (["--target", "pytorch", "--gpu", "h100"],
     "build_engine: error: an NVFP4 KV cache needs Blackwell (SM 100) or newer on h100 (SM 90): "
     "use --kv-cache-dtype fp8 ("),
    (["--target", "pytorch"], "build_engine: error: --kv-cache-dtype nvfp4 needs a head_dim that is "
                              "a multiple of 16 (its blocks of 16 along head_dim), this model has 8; "
                              "use --kv-cache-dtype fp8"),
], ids=["engine", "pytorch_on_hopper", "head_dim_8"])
def test_cli_refusals_exit_2_nothing_written(tmp_path, tiny_model, capsys, extra, message):
    from builders.cli import main

    hf_dir, _ = tiny_model(**({} if message.endswith("fp8") else {"head_dim": 16}))
    out = tmp_path / "out"
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
               "--fp8", "--kv-cache-dtype", "nvfp4", *extra])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines()
             if ln.startswith("build_engine: error:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not out.exists()


def test_capability_cells():
    from check.gpu import ENGINE, PYTORCH, REFUSE, Run, broken, verdict

    def refused(**kw):
        return [c.what for c in broken(Run(**kw)) if c.level == REFUSE]

    assert refused(quant_algo="NVFP4", kv_cache_quant_algo="NVFP4", target=PYTORCH, sm=100) == []
    assert refused(quant_algo="FP8", kv_cache_quant_algo="NVFP4", target=PYTORCH, sm=120) == []
    assert refused(quant_algo="FP8", kv_cache_quant_algo="NVFP4", target=PYTORCH, sm=90) == [
        "an NVFP4 KV cache needs Blackwell (SM 100) or newer"]
    assert len(refused(quant_algo="NVFP4", kv_cache_quant_algo="NVFP4", target=ENGINE,
                       family="llama")) == 1
    assert [verdict("kv_cache_quant_algo", "NVFP4", sm, t) for sm, t in
            ((90, PYTORCH), (100, PYTORCH), (100, ENGINE))] == ["refused", "yes", "refused"]
    assert verdict("kv_cache_quant_algo", "FP8", 100, ENGINE) == "yes"  # unchanged


@pytest.mark.slow  # the whole CLI: layer-wise calibration, the unified checkpoint, the quality gate
def test_cli_target_pytorch_builds_and_gates_quality(tmp_path, tiny_model, capsys):
    """``--target pytorch --nvfp4 --kv-cache-dtype nvfp4 --gpu b200`` end to end: the unified
    checkpoint declares the NVFP4 KV cache, the quality gate measures it through the reader's
    NVFP4 cache kernel, build.json records the GPU."""
    import shutil
    from pathlib import Path

    from builders.cli import main

    hf_dir, _ = tiny_model(head_dim=16)
    for f in (Path(__file__).resolve().parent / "golden" / "tokenizer").iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--target", "pytorch",
                 "--no-progress", "--nvfp4", "--kv-cache-dtype", "nvfp4", "--gpu", "b200",
                 "--calib-size", "4", "--calib-seq-len", "64", "--max-ppl-increase", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "quality gate (NVFP4 + NVFP4 KV cache)" in printed, printed
    record = json.loads((out / "build.json").read_text())
    assert record["options"]["target_gpu"]["sm"] == 100
    assert record["options"]["quantization"]["quality_gate"]["passed"] is True
    ckpt = next(p.parent for p in out.rglob("hf_quant_config.json"))
    q = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == ("NVFP4", "NVFP4")
