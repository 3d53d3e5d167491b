"""Pre-quantized int4 inputs (GPTQ, AWQ GEMM, compressed-tensors pack-quantized): the refusals of
their quantization_config, every rank's TensorRT-LLM tensors against the source's own
dequantization (the sources written by the packers' formats restated in prequant_packers.py,
independently of convert/prequant), check/, and the reader's logits against the HF model holding
the source's dequantized weights.

What TensorRT-LLM computes from a W4A16_AWQ checkpoint with zero points (restated here): the int4
``weight`` [out/2, in], two signed nibbles a byte along the output (low = even row), times
``weights_scaling_factor`` [out, in/g] (cast to the model dtype; the sources' float16 scales are
exact), plus ``zero`` [in/g, out] (model dtype): ``w = q * scale + zero``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from builders.cli import main
from check import check_dir
from common.errors import UserError
from convert.prequant.scheme import read_source_quant
from convert_helper import convert_checkpoint
from prequant_packers import quantization_config, write_prequantized
from quantize.formats import QuantSpec
from verify.reference import verify

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
#: TensorRT-LLM linear -> (HF linears stacked along the output, split dim: 0 column, 1 row)
TRT = {"attention.qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 0),
       "attention.dense": (("self_attn.o_proj",), 1), "mlp.fc": (("mlp.gate_proj",), 0),
       "mlp.gate": (("mlp.up_proj",), 0), "mlp.proj": (("mlp.down_proj",), 1)}


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _signed_rows(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] -> the signed int4 codes [out, in] (low nibble = even row)."""
    b = packed.view(torch.uint8).long()
    low, high = b & 0xF, b >> 4
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=1).reshape(b.shape[0] * 2, b.shape[1])


def _rank_slice(x: torch.Tensor, dim: int, tp: int, r: int, g: int = 1) -> torch.Tensor:
    return torch.chunk(x, tp, dim=dim)[r] if dim == 0 else torch.chunk(x, tp, dim=1)[r]


def _source(tmp_path, tiny_model, method, g, sym, v2=False, layers=2, dtype=torch.float16):
    hf_dir, _ = tiny_model(num_hidden_layers=layers, **SHAPE)
    src = tmp_path / "src"
    codes, deq = write_prequantized(hf_dir, src, method, g, sym, v2, dtype=dtype)
    return src, codes, deq


def _spec(src) -> QuantSpec:
    return QuantSpec.for_source(read_source_quant(json.loads((src / "config.json").read_text())))


# ----- the quantization_config's refusals ------------------------------------------------------

GPTQ = quantization_config("gptq", 128, True)
CT = quantization_config("compressed-tensors", 128, True)
W = CT["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "bitsandbytes"}, "the model's quantization_config has quant_method "
     "'bitsandbytes'; supported pre-quantized inputs: gptq, awq, compressed-tensors; convert its "
     "float model instead"),
    ({**GPTQ, "desc_act": True}, "the model's quantization_config has desc_act true (act-order: "
     "g_idx assigns each input its group out of order, and TensorRT-LLM's groupwise kernel takes "
     "contiguous groups); use a desc_act false export of the model, or convert its float model"),
    ({**GPTQ, "bits": 8}, "the model's quantization_config has bits 8: only 4-bit gptq converts "
     "here (8-bit groupwise would be TensorRT-LLM's W8A16_GPTQ, which this tool does not write); "
     "convert its float model instead"),
    ({**GPTQ, "group_size": -1}, "the model's quantization_config has group_size -1: supported "
     "gptq group sizes are 32, 64, 128 (TensorRT-LLM's groupwise kernels; -1, per channel, is not "
     "one); convert its float model instead"),
    ({**quantization_config("awq", 64, False), "version": "gemv"}, "the model's "
     "quantization_config has AWQ version 'gemv': only AutoAWQ's GEMM packing converts; re-export "
     "it with version gemm, or convert its float model"),
    ({**CT, "config_groups": {"a": CT["config_groups"]["group_0"], "b": {}}}, "the model's "
     "quantization_config has 2 compressed-tensors config_groups: mixed schemes do not convert "
     "(one quant_algo per checkpoint); convert its float model instead"),
    ({**CT, "config_groups": {"g": {"weights": W, "input_activations": {"num_bits": 8}}}},
     "the model's quantization_config quantizes activations too: only weight-only int4 (W4A16) "
     "converts; convert its float model instead"),
    ({**CT, "config_groups": {"g": {"weights": {**W, "actorder": "group"}}}}, "the model's "
     "quantization_config has actorder 'group' (g_idx assigns each input its group out of order, "
     "and TensorRT-LLM's groupwise kernel takes contiguous groups); use an export without "
     "actorder, or convert its float model"),
])
def test_quantization_config_refusals_are_one_line(qc, message):
    with pytest.raises(UserError) as e:
        read_source_quant({"quantization_config": qc})
    assert str(e.value) == message


def test_cli_refuses_a_format_flag_on_a_prequantized_input(tmp_path, tiny_model, capsys):
    src, _, _ = _source(tmp_path, tiny_model, "gptq", 128, False)
    out = tmp_path / "out"
    capsys.readouterr()  # the tiny model's save
    assert main(["--model", str(src), "--output", str(out), "--awq", "--checkpoint-only",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"build_engine: error: {src} is already quantized (gptq int4, group 128, asym): "
                   f"it converts as it is, without calibration; drop --awq"]
    assert not out.exists()
    assert main(["--model", str(src), "--output", str(out), "--verify", "--checkpoint-only",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"build_engine: error: --verify reads the model as float weights; {src} is already "
        f"quantized (gptq int4, group 128, asym): drop --verify"]
    assert not out.exists()
    assert main(["--model", str(src), "--output", str(out), "--target", "pytorch",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "build_engine: error: --target pytorch: an asymmetric pre-quantized int4 input has no "
        "unified checkpoint (modelopt's W4A16_AWQ has no zero points); use --target engine"]
    assert not out.exists()


# ----- tensors against the source's dequantization ---------------------------------------------


SLOW = pytest.mark.slow


BF16 = torch.bfloat16


@pytest.mark.parametrize("method,g,sym,v2,tp,dtype", [
    ("gptq", 128, True, False, 2, None), ("gptq", 64, False, False, 2, None),
    ("awq", 32, False, False, 1, BF16), ("compressed-tensors", 128, False, False, 2, None),
    pytest.param("gptq", 128, True, False, 1, None, marks=SLOW),
    pytest.param("gptq", 32, False, True, 1, BF16, marks=SLOW),
    pytest.param("awq", 128, False, False, 2, None, marks=SLOW),
    pytest.param("compressed-tensors", 64, True, False, 1, None, marks=SLOW),
])
def test_tensors_equal_the_source_dequantization(tmp_path, tiny_model, method, g, sym, v2, tp,
                                                 dtype):
    dtype = dtype or torch.float16
    src, codes, deq = _source(tmp_path, tiny_model, method, g, sym, v2, dtype=dtype)
    cfg = convert_checkpoint(src, tmp_path / "ck", tp=tp, progress=False, quant=_spec(src))
    assert cfg["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None,
                                   "group_size": g, "has_zero_point": not sym,
                                   "pre_quant_scale": False, "exclude_modules": ["lm_head"]}
    for r in range(tp):
        got = _read(tmp_path / "ck" / f"rank{r}.safetensors")
        for layer in range(2):
            for trt, (hfs, dim) in TRT.items():
                name = f"transformer.layers.{layer}.{trt}"
                parts = [codes[f"model.layers.{layer}.{h}."] for h in hfs]
                q = torch.cat([_rank_slice(p[0], dim, tp, r) for p in parts])
                s = torch.cat([_rank_slice(p[1], dim, tp, r) for p in parts]).double()
                z = torch.cat([_rank_slice(p[2], dim, tp, r) for p in parts])
                source = s.repeat_interleave(g, 1) * (q - z.repeat_interleave(g, 1))
                codes_trt = _signed_rows(got[f"{name}.weight"])
                wsf = got[f"{name}.weights_scaling_factor"]
                assert wsf.dtype == torch.float32 and torch.equal(wsf.double(), s), name
                assert torch.equal(codes_trt + 8, q), name  # the codes moved, not re-quantized
                trt_w = codes_trt.double() * wsf.double().repeat_interleave(g, 1)
                if sym:
                    assert f"{name}.zero" not in got
                    assert torch.equal(trt_w, source), name  # exactly the source's
                    continue
                zero = got[f"{name}.zero"]
                assert zero.dtype == dtype and zero.shape == (q.shape[1] // g, q.shape[0])
                # scale * (8 - zero point), rounded once to the model dtype (TensorRT-LLM's GPTQ
                # converter's zeros_x_scales_fp16)
                assert torch.equal(zero.T, (s * (8 - z)).to(dtype)), name
                trt_w = trt_w + zero.T.double().repeat_interleave(g, 1)
                # the source's dequantization up to that one rounding of the zero
                ulp = 2.0 ** (-11 if dtype == torch.float16 else -8)
                bound = (s * (8 - z)).abs().repeat_interleave(g, 1) * ulp
                assert ((trt_w - source).abs() <= bound).all(), name
        flt = {k for k in got if ".attention." not in k and ".mlp." not in k}
        assert flt == {"transformer.vocab_embedding.weight", "transformer.ln_f.weight",
                       "lm_head.weight", "transformer.layers.0.input_layernorm.weight",
                       "transformer.layers.0.post_layernorm.weight",
                       "transformer.layers.1.input_layernorm.weight",
                       "transformer.layers.1.post_layernorm.weight"}
    result = check_dir(tmp_path / "ck")  # and TensorRT-LLM 1.x would load every rank
    assert result.exit_code == 0 and not result.findings, result.summary()


@pytest.mark.parametrize("method,sym,tp", [("gptq", True, 2),
                                           pytest.param("awq", False, 1, marks=SLOW),
                                           pytest.param("compressed-tensors", False, 2, marks=SLOW)])
def test_reader_logits_equal_hf_with_the_dequantized_weights(tmp_path, tiny_model, method, sym, tp):
    from transformers import AutoConfig, AutoModelForCausalLM

    src, _, deq = _source(tmp_path, tiny_model, method, 64, sym)
    convert_checkpoint(src, tmp_path / "ck", tp=tp, progress=False, quant=_spec(src))
    config = AutoConfig.from_pretrained(src)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(deq, strict=False)
    model.tie_weights()
    report, passed = verify(tmp_path / "ck", model.eval())
    assert passed and report["rel_err"] < 2e-3, report
    assert report["argmax_agreement"] == 1.0, report


def test_cli_converts_and_checks_a_gptq_directory(tmp_path, tiny_model, capsys):
    src, _, _ = _source(tmp_path, tiny_model, "gptq", 128, True)
    out = tmp_path / "out"
    capsys.readouterr()  # the tiny model's save
    assert main(["--model", str(src), "--output", str(out), "--checkpoint-only", "--no-progress",
                 "--tp", "2"]) == 0
    printed = capsys.readouterr().out
    assert "calibration:" not in printed
    assert f"check: PASS {out / 'checkpoint.partial'}: LlamaForCausalLM, float16 W4A16_AWQ, " \
           f"tp 2 pp 1, 2 rank(s): " in printed
    record = json.loads((out / "build.json").read_text())
    assert record["options"]["quantization"] == {"quant_algo": "W4A16_AWQ",
                                                 "source": "gptq int4, group 128, sym"}


# ----- fp8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,tp", [("tensor", 2), ("channel", 2),
                                         pytest.param("channel", 1, marks=SLOW)])
def test_fp8_tensors_are_the_source_bytes_and_scales(tmp_path, tiny_model, strategy, tp):
    src, codes, _ = _source(tmp_path, tiny_model, f"fp8-{strategy}", 0, True)
    cfg = convert_checkpoint(src, tmp_path / "ck", tp=tp, progress=False, quant=_spec(src))
    assert cfg["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert cfg["quantization"]["exclude_modules"] == ["*ln_f", "*ln_embed", "*lm_head"]
    assert cfg["quantization"]["use_meta_recipe"] is False
    for r in range(tp):
        got = _read(tmp_path / "ck" / f"rank{r}.safetensors")
        for layer in range(2):
            for trt, (hfs, dim) in TRT.items():
                name = f"transformer.layers.{layer}.{trt}"
                parts = [codes[f"model.layers.{layer}.{h}."] for h in hfs]
                w = torch.cat([_rank_slice(p["weight"].view(torch.uint8), dim, tp, r) for p in parts])
                rows = [p["weight_scale"].reshape(-1).expand(p["weight"].shape[0]) for p in parts]
                # a column split takes the rank's rows' scales; a row split keeps every row
                s = torch.cat([_rank_slice(x, 0, tp, r) if dim == 0 else x for x in rows])
                assert got[f"{name}.weight"].dtype == torch.float8_e4m3fn
                assert torch.equal(got[f"{name}.weight"].view(torch.uint8), w), name
                assert got[f"{name}.per_channel_scale"].dtype == torch.float32
                assert torch.equal(got[f"{name}.per_channel_scale"], s), name
    result = check_dir(tmp_path / "ck")
    assert result.exit_code == 0 and not result.findings, result.summary()


def test_fp8_reader_logits_close_to_hf_with_the_dequantized_weights(tmp_path, tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    src, _, deq = _source(tmp_path, tiny_model, "fp8-channel", 0, True)
    convert_checkpoint(src, tmp_path / "ck", tp=2, progress=False, quant=_spec(src))
    config = AutoConfig.from_pretrained(src)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(deq, strict=False)
    report, passed = verify(tmp_path / "ck", model.eval())
    # the weights are the source's; the per-token fp8 activations are the format's only loss
    assert passed and report["rel_err"] < 0.1, report


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
     "the model's quantization_config has block-scaled fp8 weights (weight_block_size [128, 128], "
     "weight_scale_inv: FP8_BLOCK_SCALES, which TensorRT-LLM 1.2 runs on its PyTorch backend "
     "only, _torch/modules/linear.py; the engine flow's quantization/layers.py has no such "
     "linear); use --target pytorch (which reads the weights dequantized, convert/block_fp8.py), "
     "or convert its float model"),
])
def test_fp8_refusals(qc, message):
    with pytest.raises(UserError) as e:
        read_source_quant({"quantization_config": qc})
    assert str(e.value) == message


def test_an_act_order_g_idx_without_desc_act_is_refused(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    src, _, _ = _source(tmp_path, tiny_model, "gptq", 64, True)
    f = src / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()  # groups out of order
    save_file(tensors, str(f))
    with pytest.raises(UserError) as e:
        convert_checkpoint(src, tmp_path / "ck", progress=False, quant=_spec(src))
    assert str(e.value) == (f"{name} assigns inputs to groups out of order (act-order) although "
                            f"the quantization_config does not set desc_act; TensorRT-LLM's "
                            f"groupwise kernel takes contiguous groups: convert the float model "
                            f"instead")
    assert not (tmp_path / "ck").exists()


# ----- --target pytorch ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", pytest.param("compressed-tensors", marks=SLOW)])
def test_pytorch_target_writes_the_source_codes_as_modelopts_unified_awq(tmp_path, tiny_model,
                                                                         method):
    """modelopt's unified W4A16_AWQ: uint8 [out/2, in] (low nibble = even row, signed), float32
    weight_scale [out, in/g], q/k/v and gate/up's pre_quant_scale folded (absent: identity),
    o_proj / down_proj's kept (ones); the unified reader's logits equal the HF model holding the
    source's dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, codes, deq = _source(tmp_path, tiny_model, method, 64, True)
    out = tmp_path / "out"
    assert main(["--model", str(src), "--output", str(out), "--target", "pytorch",
                 "--no-progress", "--triton-target", "none"]) == 0
    ckpt = out / "hf_quantized"
    hf_quant = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
                        "has_zero_point": False, "pre_quant_scale": True,
                        "exclude_modules": ["lm_head", "model.embed_tokens"]}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    got = _read(ckpt / "model.safetensors")
    for prefix, (q, s, _) in codes.items():
        assert got[prefix + "weight"].dtype == torch.uint8
        assert torch.equal(_signed_rows(got[prefix + "weight"]) + 8, q), prefix
        assert torch.equal(got[prefix + "weight_scale"], s.float()), prefix
        keeps = prefix.endswith(("o_proj.", "down_proj."))
        assert (prefix + "pre_quant_scale" in got) == keeps, prefix
        if keeps:
            assert torch.equal(got[prefix + "pre_quant_scale"],
                               torch.ones(q.shape[1], dtype=torch.float16))
    config = AutoConfig.from_pretrained(src)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(deq, strict=False)
    report, passed = verify(ckpt, model.eval())
    assert passed and report["rel_err"] < 1e-4 and report["argmax_agreement"] == 1.0, report


def test_pytorch_target_writes_a_per_tensor_fp8_source_as_modelopts_unified_fp8(tmp_path,
                                                                                tiny_model):
    """Per-tensor weight and static input scales: modelopt's unified FP8, the e4m3 bytes copied,
    each linear's scales as float32 scalars; the unified reader's logits close to the HF model
    with the source's dequantized weights (its fp8 activations are the only loss)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, codes, deq = _source(tmp_path, tiny_model, "fp8-tensor", 0, True)
    out = tmp_path / "out"
    assert main(["--model", str(src), "--output", str(out), "--target", "pytorch",
                 "--no-progress", "--triton-target", "none"]) == 0
    ckpt = out / "hf_quantized"
    hf_quant = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "FP8"
    got = _read(ckpt / "model.safetensors")
    for prefix, packed in codes.items():
        assert torch.equal(got[prefix + "weight"].view(torch.uint8),
                           packed["weight"].view(torch.uint8)), prefix
        assert got[prefix + "weight_scale"].shape == () and \
            torch.equal(got[prefix + "weight_scale"], packed["weight_scale"].reshape(())), prefix
        assert torch.equal(got[prefix + "input_scale"], torch.tensor(0.05)), prefix
    config = AutoConfig.from_pretrained(src)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(deq, strict=False)
    report, passed = verify(ckpt, model.eval())
    assert passed and report["rel_err"] < 0.2, report
