"""--nvfp4 for the dense non-Llama families: Mistral (the Llama spec), Qwen2 (q/k/v bias) and
Qwen3 (per-head q/k norms), both targets. TensorRT-LLM 1.2's ``fp4_quantize`` swaps every
ColumnLinear / RowLinear for FP4Linear / FP4RowLinear whatever the model class (biases and norms
stay float), so the engine checkpoint is modelopt 0.47's ``export_tensorrt_llm_checkpoint`` of the
family's decoder type (llama / qwen), tensor for tensor at tp 1 and 2; ``--target pytorch`` is its
``export_hf_checkpoint``. Their checkpoints pass ``check``; the reader runs them."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from convert_helper import convert_checkpoint
from quant_common import TINY, byte_tokenizer
from quantize.calibrate import calibrate
from test_quantize_convert import assert_same_checkpoint, lw, spec_for

#: Qwen3's tiny shape: head_dim 64 != hidden / heads (the q/k norms' [head_dim])
QWEN3 = dict(TINY, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
SHAPES = {"mistral": TINY, "qwen2": TINY, "qwen3": QWEN3}
DECODER = {"mistral": "llama", "qwen2": "qwen", "qwen3": "qwen"}
#: config.json keys modelopt's manual path writes differently by design: TensorRT-LLM's own Qwen
#: converter's qwen_type / seq_length, the architecture TensorRT-LLM's MODEL_MAP reads
BY_DESIGN = {"qwen_type", "seq_length", "architecture"}


def _calibrated(root, family, calib_text, kv=None):
    from examples.tiny import make_tiny_model

    model = make_tiny_model(root / "hf", family=family, **SHAPES[family]).float().eval()
    spec = spec_for("NVFP4", kv)
    q = copy.deepcopy(model)
    calibrate(q, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    return model, q, spec


def _modelopt_trtllm(q, family, out, tp):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    m = copy.deepcopy(q)
    m.config.rope_theta = m.config.rope_parameters["rope_theta"]  # transformers >= 5 quirk
    export_tensorrt_llm_checkpoint(m, decoder_type=DECODER[family], dtype=torch.float16,
                                   export_dir=out, inference_tensor_parallel=tp)
    return out


@pytest.mark.parametrize("family,kv,tps", [
    ("qwen2", None, (1, 2)),
    pytest.param("qwen3", None, (1, 2), marks=pytest.mark.slow),
    pytest.param("mistral", "fp8", (2,), marks=pytest.mark.slow),
])
def test_engine_checkpoint_equals_modelopt_export(tmp_path, calib_text, family, kv, tps):
    from check import check_dir

    _, q, spec = _calibrated(tmp_path, family, calib_text, kv)
    for tp in tps:
        ours = tmp_path / f"ours_tp{tp}"
        convert_checkpoint(tmp_path / "hf", ours, tp=tp, dtype="float16", progress=False,
                           quant=spec, calibration=lw(tmp_path, calib_text))
        assert_same_checkpoint(ours, _modelopt_trtllm(q, family, tmp_path / f"mo_tp{tp}", tp),
                               extra_config_keys=BY_DESIGN)
        rank0 = load_file(ours / "rank0.safetensors")
        assert rank0["transformer.layers.0.attention.qkv.weight"].dtype == torch.uint8
        if family == "qwen2":  # the float bias beside the FP4 qkv
            assert rank0["transformer.layers.0.attention.qkv.bias"].dtype == torch.float16
        if family == "qwen3":  # the per-head norms, float
            assert rank0["transformer.layers.0.attention.q_layernorm.weight"].shape == (64,)
        result = check_dir(ours)
        assert result.exit_code == 0 and not result.findings, result.summary()


def test_reader_runs_qwen3_nvfp4_and_tp1_equals_tp2(tmp_path, calib_text):
    """The reader on the converter's Qwen3 NVFP4 checkpoints: tp 1 and tp 2 read alike and track
    the float model (q/k norms applied after the FP4 qkv)."""
    from verify.reference import ReferenceModel, compare_with_hf

    model, _, spec = _calibrated(tmp_path, "qwen3", calib_text)
    ids = torch.tensor([byte_tokenizer(calib_text[5000:5064])])
    outs = []
    for tp in (1, 2):
        convert_checkpoint(tmp_path / "hf", tmp_path / f"tp{tp}", tp=tp, dtype="float32",
                           progress=False, quant=spec, calibration=lw(tmp_path, calib_text))
        outs.append(ReferenceModel(tmp_path / f"tp{tp}").forward(ids))
    assert float((outs[0] - outs[1]).norm() / outs[0].norm()) < 1e-3
    r = compare_with_hf(tmp_path / "tp1", model, input_ids=ids)
    print(f"\nQwen3 NVFP4 reader vs float: rel {r['rel_err']:.3f}, argmax {r['argmax_agreement']:.3f}")
    assert r["rel_err"] < 0.6 and r["argmax_agreement"] >= 0.25, r


def test_engine_family_rule_admits_qwen2_qwen3():
    """The engine target's NVFP4 family rule, in the recipe and in the capability table: Llama /
    Mistral, Qwen2, Qwen3 pass; a family outside them (a test double of the Llama spec under
    another name) is refused in one line naming the way out."""
    import dataclasses

    from check.gpu import Run, broken
    from model.families import FAMILIES

    spec = spec_for("NVFP4")
    for name in ("llama", "qwen2", "qwen3"):
        assert spec.format.family_refusal(spec, FAMILIES[name], "engine") is None
        assert broken(Run("NVFP4", family=name, sm=100)) == []
    other = dataclasses.replace(FAMILIES["llama"], name="other", architectures=("OtherForCausalLM",))
    assert spec.format.family_refusal(spec, other, "engine") == (
        "--nvfp4 engines are written for the Llama / Mistral, Mixtral, Qwen2, Qwen3, Gemma 2 / 3 and "
        "Phi-3 families only, not OtherForCausalLM: its NVFP4 tensors are not tested against "
        "modelopt 0.47's export here; use --target pytorch, --fp8 or --awq")
    assert spec.format.family_refusal(spec, other, "pytorch") is None
    assert [c.fix for c in broken(Run("NVFP4", family="other", sm=100))] == ["use --target pytorch"]
