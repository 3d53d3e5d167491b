"""DeepSeek-V3 / R1 (model/families/deepseek_v3.py): --target pytorch only.

* the float unified checkpoint equals nvidia-modelopt 0.47's ``export_hf_checkpoint`` of the same
  transformers 5 model tensor for tensor (the routed experts: modelopt writes transformers 5's
  in-memory stacks ``mlp.experts.gate_up_proj`` / ``down_proj``, we the Hub's per-expert tensors
  that TensorRT-LLM's PyTorch backend loads; the same values), config.json equal;
* a block-scaled FP8 source (DeepSeek-V3's release format, examples/block_fp8.py) gives the same
  checkpoint, byte for byte, as its dequantized bf16 copy; its reader (convert/block_fp8.py, numpy)
  equals torch's dequantization on row slices across partial blocks;
* the reference reader runs the unified checkpoint (verify/unified_planned.py: the family's plan
  into TensorRT-LLM's MLA form, verify/mla.py, noaux_tc routing in verify/reference_moe.py):
  float32 logits = HF's within 1e-5 on both MLA paths, and a reader without the correction bias
  is caught; ``--verify`` passes;
* the refusals: --target engine (no TensorRT engine class), quantized formats, malformed scales.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from builders.cli import main
from convert_helper import refused
from examples.block_fp8 import dequantize, dequantized_copy, make_block_fp8


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """tiny-deepseek-v3 (examples/tiny.py) in float32, its FP8 release-format copy and that
    copy dequantized to bf16."""
    from examples.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("v3")
    model = make_tiny_model(root / "f32", family="deepseek_v3")
    fp8 = make_block_fp8(root / "f32", root / "fp8")
    return {"f32": root / "f32", "model": model.eval(), "fp8": fp8,
            "bf16": dequantized_copy(fp8, root / "bf16")}


def _pytorch_target(model_dir, out, tokenizer_dir, *flags):
    rc = main(["--model", str(model_dir), "--target", "pytorch", "--output", str(out),
               "--tokenizer-dir", str(tokenizer_dir), "--no-progress", *flags])
    assert rc == 0
    return out / "hf_quantized"


def _config(d):
    return json.loads((d / "config.json").read_text())


def test_shape_reads_mla_noaux_tc_and_dense_layers(v3):
    from model.config import read_hf_config
    from model.shape import model_shape

    s = model_shape(read_hf_config(v3["f32"]))
    assert (s.family, s.experts, s.top_k, s.first_dense, s.moe_inter, s.shared_inter) == \
        ("deepseek_v3", 8, 2, 1, 160, 160)
    assert (s.mla.q_lora, s.mla.kv_lora, s.mla.nope, s.mla.rope, s.mla.v) == (96, 64, 32, 16, 32)
    assert s.kv_heads == 1 and s.head_size == 80


@pytest.mark.slow
def test_float_unified_equals_modelopt_export(tmp_path, v3, tokenizer_dir):
    from modelopt.torch.export import export_hf_checkpoint

    ours = _pytorch_target(v3["f32"], tmp_path / "ours", tokenizer_dir)
    export_hf_checkpoint(v3["model"], export_dir=tmp_path / "theirs")
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    stacks = {n for n in b if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))}
    assert len(stacks) == 4  # two MoE layers
    for name in stacks:
        for e, w in enumerate(b.pop(name)):
            p = name.rsplit(".", 1)[0] + f".{e}."
            if name.endswith("down_proj"):
                assert torch.equal(a.pop(p + "down_proj.weight"), w)
            else:
                assert torch.equal(torch.cat([a.pop(p + "gate_proj.weight"),
                                              a.pop(p + "up_proj.weight")]), w)
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    assert _config(ours) == _config(tmp_path / "theirs")
    assert not (ours / "hf_quant_config.json").exists()


def test_block_fp8_source_equals_its_dequantized_bf16_copy(tmp_path, v3, tokenizer_dir):
    """The decision: an FP8 block-scaled source is written as the bf16 model it encodes."""
    a = _pytorch_target(v3["fp8"], tmp_path / "fp8", tokenizer_dir)
    b = _pytorch_target(v3["bf16"], tmp_path / "bf16", tokenizer_dir)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ta) == sorted(tb) and not any(n.endswith("scale_inv") for n in ta)
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, n
        assert torch.equal(ta[n].view(torch.uint8), tb[n].view(torch.uint8)), n
    assert ta["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16
    assert ta["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert _config(a) == _config(b) and "quantization_config" not in _config(a)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("rows", [slice(0, 192), slice(100, 150), slice(120, 140),
                                  slice(159, 160)])
def test_block_fp8_reader_rows_equal_torch_dequantization(v3, rows):
    from convert.block_fp8 import BlockFp8Source
    from quantize.torch_io import read_tensor

    src = BlockFp8Source(v3["fp8"], (128, 128), "bfloat16")
    raw = load_file(v3["fp8"] / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.gate_proj.weight"  # [160, 192]: partial blocks both ways
    want = dequantize(raw[name], raw[name[:-len("weight")] + "weight_scale_inv"])
    assert not src.stored(name) and name[:-len("weight")] + "weight_scale_inv" not in src
    got = read_tensor(src, name, (rows,))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want[rows])
    src.close()


def test_engine_target_is_refused_in_one_line(tmp_path, capsys, v3):
    refused(capsys, ["--model", str(v3["f32"]), "--checkpoint-only"], tmp_path / "out",
            r"^build_engine: error: DeepseekV3ForCausalLM \(DeepSeek-V3 / R1\) has no TensorRT "
            r"engine in TensorRT-LLM 1\.2 \(no engine model class; NVIDIA/TensorRT-LLM #2831, "
            r"#2845\): it runs on the PyTorch backend from a unified checkpoint; use --target "
            r"pytorch$")


def test_fp8_source_on_the_engine_target_is_refused(tmp_path, capsys, v3):
    refused(capsys, ["--model", str(v3["fp8"]), "--target", "engine", "--checkpoint-only"],
            tmp_path / "out", "block-scaled fp8 weights .* use --target pytorch")


@pytest.mark.parametrize("flags,pattern", [
    (["--fp8"], "deepseek_v3 with FP8 on --target pytorch is not supported yet; supported: float"),
    (["--nvfp4"], "deepseek_v3 with NVFP4 on --target pytorch is not supported yet"),
])
def test_quantized_formats_are_refused(tmp_path, capsys, v3, tokenizer_dir, flags, pattern):
    refused(capsys, ["--model", str(v3["f32"]), "--target", "pytorch", "--tokenizer-dir",
                     str(tokenizer_dir), *flags], tmp_path / "out", pattern)


def test_malformed_block_scales_are_refused(tmp_path, capsys, v3, tokenizer_dir):
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "bad"
    shutil.copytree(v3["fp8"], d)
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, ["--model", str(d), "--target", "pytorch", "--tokenizer-dir",
                     str(tokenizer_dir)], tmp_path / "out",
            r"model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv in .* is F32 \[1, 1\]; "
            r"weight \[192, 128\] in blocks of \[128, 128\] has float32 \[2, 1\] scales; "
            r"re-download the model$")


IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_reader_fp32_logits_equal_hf_on_both_mla_paths(tmp_path, v3, tokenizer_dir,
                                                       monkeypatch):
    from dataclasses import replace

    import verify.reference_moe as moe
    from verify.model import ReferenceModel

    ck = _pytorch_target(v3["f32"], tmp_path / "out", tokenizer_dir, "--triton-target", "none")
    with torch.no_grad():
        want = v3["model"](IDS).logits
    ref = ReferenceModel(ck)
    assert ref.moe.noaux and ref.mla.first_dense == 1
    for path in ("absorbed", "context"):
        ref.mla = replace(ref.mla, path=path)
        assert _rel(ref(IDS), want) < 1e-5, path
    route = moe.route  # the correction bias matters: routing without it is caught
    monkeypatch.setattr(moe, "route", lambda x, w, spec, bias=None: route(x, w, spec, bias * 0))
    assert _rel(ref(IDS), want) > 1e-3


def test_cli_verify_passes(tmp_path, v3, tokenizer_dir, capsys):
    _pytorch_target(v3["fp8"], tmp_path / "out", tokenizer_dir, "--verify", "--triton-target", "none")
    assert "verify: PASS" in capsys.readouterr().out


def test_nan_codes_are_refused_when_read(tmp_path, v3):
    import shutil

    from safetensors.torch import save_file

    from common.errors import UserError
    from convert.block_fp8 import BlockFp8Source

    d = tmp_path / "nan"
    shutil.copytree(v3["fp8"], d)
    t = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    t[name].view(torch.uint8)[130, 5] = 0x7F  # e4m3 NaN
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    src = BlockFp8Source(d, (128, 128), "bfloat16")
    src.read_bits(name, (slice(0, 128),))  # the rows asked for only
    with pytest.raises(UserError, match=rf"^{name} has 1 non-finite values in rows 128\.\.191 "):
        src.read_bits(name, (slice(128, 192),))
    src.close()

