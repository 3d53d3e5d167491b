"""Phi-3's calibrated formats (model/families/phi3.py: fused HF ``qkv_proj`` / ``gate_up_proj``),
calibrated layer by layer from the store as for the other families.

- Engine target: FP8 (+ FP8 KV), INT4-AWQ (group 128 / 64, + FP8 KV), W4A8-AWQ and NVFP4
  (+ FP8 KV). tp 1 equals nvidia-modelopt 0.47's TensorRT-LLM export for decoder "phi3" tensor
  for tensor (modelopt's own whole-model calibration of the same model on the same text). At tp 2
  modelopt's phi3 layout is not what TensorRT-LLM's Phi-3 runs (tests/test_phi3.py shows it), so
  each rank is checked against an independent slicing of the tp-1 tensors: q/k/v heads and the
  [up; gate] halves of mlp.fc cut per rank (packed int4 rows and per-group scales alike), the
  row-parallel linears' input columns (and AWQ's pre-quant scales) split, per-tensor scales
  whole. The reader gives HF's logits within the format's tolerance and ``check`` passes.
- ``--target pytorch``: FP8 (+ FP8 KV), a KV cache alone, INT4-AWQ, INT8 weight-only and NVFP4
  (+ FP8 KV) equal modelopt 0.47's ``export_hf_checkpoint`` tensor for tensor.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from builders.cli import main
from convert_helper import convert_checkpoint
from quant_common import byte_tokenizer
from quantize.run import CalibrationRun
from test_phi3 import hf_logits, modelopt_phi3_weights, rel
from verify.reference import ReferenceModel

#: hidden 128 / 8 heads of 16 over 4 KV heads (AWQ's group 64 whole on every rank at tp 2)
MID = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
#: group 128 whole on every rank's row-parallel inputs at tp 2
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=8)
ROW_PARALLEL = ("attention.dense", "mlp.proj")


def spec(algo, kv=None, block=None):
    from test_quantize_convert import spec_for

    return spec_for(algo, kv, block)


def calibrated(tmp_path, calib_text, quant, **overrides):
    """(hf_dir, the tiny Phi-3 calibrated whole by modelopt on ``calib_text``, fp32, and its
    float copy: HF's logits)."""
    from examples.tiny import make_tiny_model
    from quantize.calibrate import calibrate

    model = make_tiny_model(tmp_path / "hf", family="phi3", **overrides).float().eval()
    hf = copy.deepcopy(model)
    calibrate(model, quant, calib_text, tokenizer=byte_tokenizer, progress=False)
    return tmp_path / "hf", model, hf


def store(tmp_path, text) -> CalibrationRun:
    """The converter's layer-wise calibration, kept so that a second layout reuses it."""
    return CalibrationRun(store=tmp_path / "calibration", device="cpu", calib_text=text,
                          tokenizer=byte_tokenizer)


def independent_rank(t1: dict, r: int, tp: int, heads: int, kv: int) -> dict:
    """Rank r of a tp-1 checkpoint's quantized linears as TensorRT-LLM's Phi-3 runs them: rows
    in proportion to the outputs (packed int4: half as many), input columns of the row-parallel
    linears, 1-element tensors whole."""
    out = {}
    for name, t in t1.items():
        if ".layers." not in name or "layernorm" in name or "cache_scaling" in name:
            continue
        mod, suffix = name.split(".layers.", 1)[1].split(".", 1)[1].rsplit(".", 1)
        if t.numel() == 1 or (suffix == "prequant_scaling_factor" and mod not in ROW_PARALLEL):
            out[name] = t
        elif mod in ROW_PARALLEL:
            out[name] = t.chunk(tp, dim=-1)[r]
        elif mod == "attention.qkv":
            unit = t.shape[0] // (heads + 2 * kv)  # rows per head
            q, k, v = t.split([heads * unit, kv * unit, kv * unit])
            out[name] = torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]])
        else:  # mlp.fc: [up; gate] at tp 1, each half split
            up, gate = t.chunk(2)
            out[name] = torch.cat([up.chunk(tp)[r], gate.chunk(tp)[r]])
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


#: (algo, kv, AWQ group, shape, the reader's tolerance): relative error of the tp-2 checkpoint's
#: logits through the reader against modelopt's fake-quantized model (the format's numerics, as
#: tests/test_reference_quant.py measures); NVFP4's fake quantization needs CUDA, so it is
#: measured against the float model within tests/test_nvfp4.py's bounds instead
ENGINE_CASES = [
    ("FP8", "fp8", None, {}, 0.15),
    pytest.param("W4A16_AWQ", None, None, WIDE, 0.01, marks=pytest.mark.slow),
    ("W4A16_AWQ", "fp8", 64, MID, 0.15),
    pytest.param("W4A8_AWQ", None, None, WIDE, 0.2, marks=pytest.mark.slow),
    ("NVFP4", "fp8", None, MID, 0.6),
]


@pytest.mark.parametrize("algo,kv,block,shape,tol", ENGINE_CASES,
                         ids=["fp8_kv_fp8", "awq128", "awq64_kv_fp8", "w4a8_awq", "nvfp4_kv_fp8"])
def test_calibrated_equals_modelopt_and_runs(tmp_path, calib_text, capsys, algo, kv, block, shape,
                                             tol):
    quant = spec(algo, kv, block)
    hf_dir, model, hf = calibrated(tmp_path, calib_text, quant, **shape)
    run = store(tmp_path, calib_text)
    cfg = convert_checkpoint(hf_dir, tmp_path / "tp1", tp=1, dtype="float16", progress=False,
                             quant=quant, calibration=run)
    assert cfg["quantization"]["quant_algo"] == algo
    ours, (theirs,) = load_file(tmp_path / "tp1" / "rank0.safetensors"), modelopt_phi3_weights(model, 1)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert same(ours[name], t), name
    heads, kvh = model.config.num_attention_heads, model.config.num_key_value_heads
    convert_checkpoint(hf_dir, tmp_path / "tp2", tp=2, dtype="float16", progress=False,
                       quant=quant, calibration=run)  # the same store, reused
    for r in range(2):
        rank = load_file(tmp_path / "tp2" / f"rank{r}.safetensors")
        want = independent_rank(ours, r, 2, heads, kvh)
        assert all(same(rank[n], t) for n, t in want.items()), r
        assert sorted(rank) == sorted(ours)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    want = hf_logits(hf if algo == "NVFP4" else model, ids)
    got = ReferenceModel(tmp_path / "tp2").forward(ids)[..., :want.shape[-1]]  # AWQ pads to 64
    err = rel(got, want)
    with capsys.disabled():
        print(f"\nphi3 {algo} kv {kv} tp2 reader vs {'float' if algo == 'NVFP4' else 'fake quant'}: "
              f"{err:.3e}")
    assert err < tol, err
    assert main(["check", str(tmp_path / "tp2")]) == 0
    assert "check: PASS" in capsys.readouterr().out


def test_quantized_reader_can_fail(tmp_path, calib_text):
    """The reader's tolerance means something: FP8 mlp.fc halves in HF's [gate; up] order (the
    fused module's rows as they are) at least double the error against modelopt's fake quant."""
    from safetensors.torch import save_file

    quant = spec("FP8", None)
    hf_dir, model, _ = calibrated(tmp_path, calib_text, quant)
    ck = tmp_path / "ck"
    convert_checkpoint(hf_dir, ck, tp=1, dtype="float16", progress=False, quant=quant,
                       calibration=store(tmp_path, calib_text))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    good = rel(ReferenceModel(ck).forward(ids), hf_logits(model, ids))
    sd = load_file(ck / "rank0.safetensors")
    for name in [n for n in sd if n.endswith("mlp.fc.weight")]:
        up, gate = sd[name].chunk(2)
        sd[name] = torch.cat([gate, up]).contiguous()
    save_file(sd, ck / "rank0.safetensors")
    bad = rel(ReferenceModel(ck).forward(ids), hf_logits(model, ids))
    assert good < 0.15 and bad > 2 * good, (good, bad)


# --- --target pytorch: modelopt's export_hf_checkpoint ----------------------------------------

@pytest.mark.parametrize("algo,kv,shape,tol", [
    ("FP8", "fp8", {}, 0.15),
    pytest.param("FP8", None, {}, 0.15, marks=pytest.mark.slow),
    (None, "fp8", {}, 0.15),
    ("W4A16_AWQ", None, MID, 0.15),
    ("NVFP4", "fp8", MID, 0.6),
    pytest.param("NVFP4", None, MID, 0.6, marks=pytest.mark.slow),
], ids=["fp8_kv_fp8", "fp8", "kv_fp8_only", "awq", "nvfp4_kv_fp8", "nvfp4"])
def test_unified_equals_modelopt_export(tmp_path, calib_text, capsys, algo, kv, shape, tol):
    """And the reader on it (verify/unified_reader: TensorRT-LLM's PyTorch-backend loading)
    against modelopt's fake quant (NVFP4: the float model), tolerances as on the engine target."""
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, modelopt_unified, small
    from verify.reference import compare_with_hf

    quant = small(algo, kv)
    hf_dir, model, hf = calibrated(tmp_path, calib_text, quant, **shape)
    write_unified_checkpoint(hf_dir, tmp_path / "ours", quant, progress=False,
                             calibration=store(tmp_path, calib_text))  # layer by layer
    ours = assert_same_checkpoint(tmp_path / "ours", modelopt_unified(model, tmp_path / "mo",
                                                                      torch.float32))
    assert any(".qkv_proj." in n for n in ours)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    r = compare_with_hf(tmp_path / "ours", hf if algo == "NVFP4" else model, input_ids=ids)
    with capsys.disabled():
        print(f"\nphi3 unified {algo} kv {kv} reader: {r['rel_err']:.3e}")
    assert r["rel_err"] < tol, r


def test_unified_weight_only_int8_equals_modelopt(tmp_path):
    import modelopt.torch.quantization as mtq

    from examples.tiny import make_tiny_model
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import assert_same_checkpoint, modelopt_unified, small

    model = make_tiny_model(tmp_path / "hf", family="phi3").float().eval()
    write_unified_checkpoint(tmp_path / "hf", tmp_path / "ours", small("W8A16"), progress=False)
    ref = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
    ours = assert_same_checkpoint(tmp_path / "ours",
                                  modelopt_unified(ref, tmp_path / "mo", torch.float32))
    assert ours["model.layers.0.mlp.gate_up_proj.weight"].dtype == torch.int8


@pytest.mark.slow
@pytest.mark.parametrize("target,flags", [
    ("engine", ["--fp8", "--kv-cache-dtype", "fp8"]),
    ("pytorch", ["--awq", "--awq-block-size", "64"]),
], ids=["engine_fp8_kv_fp8", "pytorch_awq64"])
def test_cli_builds_phi3_calibrated(tmp_path, tiny_model, tokenizer_dir, target, flags):
    """The command line, preflight to the written checkpoint (calibrated layer by layer on the
    shipped text; the engine target's checkpoint passes check before it is kept)."""
    import json
    import shutil

    hf_dir, _ = tiny_model("phi3", **MID)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--target", target, "--tp", "2",
                 "--checkpoint-only", "--no-progress", "--calib-size", "4", "--calib-seq-len", "64",
                 *flags]) == 0
    if target == "engine":
        cfg = json.loads((out / "checkpoint" / "config.json").read_text())
        assert cfg["quantization"]["quant_algo"] == "FP8" and cfg["architecture"] == "Phi3ForCausalLM"
        assert main(["check", str(out / "checkpoint")]) == 0
    else:
        hq = json.loads(next(out.rglob("hf_quant_config.json")).read_text())
        assert hq["quantization"]["quant_algo"] == "W4A16_AWQ"
