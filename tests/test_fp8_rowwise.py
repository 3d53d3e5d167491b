"""--fp8-rowwise (FP8_PER_CHANNEL_PER_TOKEN): the flags and their refusals, config.json's
``quantization`` block, every rank's tensors against an independent restatement of TensorRT-LLM's
formulas, and the reader's logits against the float HF model.

The restatement (written here, apart from quantize/recipes/fp8_rowwise): TensorRT-LLM's Llama
converter (``tensorrt_llm/models/llama/convert.py``) splits each MLP weight for the rank first
(``split(..., dim=0)`` for up/gate, ``dim=1`` for down), casts it to the checkpoint dtype, then
``fp8_per_channel_quant_weight_gpu(weight, clamp_val)``: clamp to ``clamp_val`` ([-1200, 1200]
from ``args_to_quant_config``), per row ``scale = max(amax / 448, 1 / (448 * 512))``,
``clamp(w / scale, -448, 448)`` rounded to e4m3. ``fp8_rowwise_quantize``
(``tensorrt_llm/quantization/quantize.py``) decides which modules the engine declares fp8: with
``use_meta_recipe`` not the first and last layers and no attention."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from builders.cli import main
from check import check_dir
from check.declared import declared_rank
from common.errors import UserError
from convert_helper import convert_checkpoint
from quantize.flags import add_quant_arguments
from quantize.formats import QuantSpec
from verify.reference import verify

HF_MLP = {"mlp.fc": ("gate_proj", 0), "mlp.gate": ("up_proj", 0), "mlp.proj": ("down_proj", 1)}


def _spec(*argv) -> QuantSpec:
    p = argparse.ArgumentParser()
    add_quant_arguments(p)
    return QuantSpec.from_args(p.parse_args(list(argv)))


def _restated(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-LLM's per-channel fp8 weight quantization, restated."""
    x = torch.clamp(w.to(torch.float32), -1200.0, 1200.0)
    amax = torch.max(torch.abs(x), dim=1, keepdim=True).values
    s = torch.maximum(amax / 448.0, torch.tensor(1.0 / (448.0 * 512.0)))
    q = torch.clamp(x / s, -448.0, 448.0).to(torch.float8_e4m3fn)
    return q, s[:, 0]


def _read_rank(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----- flags and refusals ----------------------------------------------------------------------


def test_flags_pick_the_recipe_and_write_trtllm_quant_config():
    mlp, meta = _spec("--fp8-rowwise"), _spec("--fp8-rowwise", "meta")
    assert (mlp.quant_algo, mlp.recipe_option, meta.recipe_option) == ("FP8_PER_CHANNEL_PER_TOKEN", "mlp", "meta")
    assert not mlp.needs_calibration and mlp.format.gated(mlp) and mlp.is_quantized
    assert mlp.name == "FP8_PER_CHANNEL_PER_TOKEN (mlp)"
    common = {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None, "group_size": 128,
              "smoothquant_val": 0.5, "clamp_val": [-1200.0, 1200.0]}
    tail = {"has_zero_point": False, "pre_quant_scale": False}
    assert list(mlp.to_trtllm_quantization().items()) == list(
        {**common, "use_meta_recipe": False, **tail, "exclude_modules": ["*attention", "*input_layernorm", "*ln_f", "*ln_embed", "*lm_head"]}.items())
    assert list(meta.to_trtllm_quantization().items()) == list(
        {**common, "use_meta_recipe": True, **tail, "exclude_modules": None}.items())
    assert _spec("--fp8-rowwise", "--max-ppl-increase", "5").max_ppl_increase == 5.0


@pytest.mark.parametrize("argv,message", [
    (["--fp8-rowwise", "--smoothquant"], "choose one weight quantization format, got --smoothquant and "
     "--fp8-rowwise; --kv-cache-dtype can be combined with any one of them"),
    (["--fp8-rowwise", "--kv-cache-dtype", "fp8"], "--fp8-rowwise with --kv-cache-dtype fp8 is not supported: "
     "TensorRT-LLM's FP8 rowwise converter writes no calibrated KV-cache scale; drop --kv-cache-dtype, "
     "or use --fp8 --kv-cache-dtype fp8"),
    (["--fp8-rowwise", "--awq-block-size", "64"], "--awq-block-size only applies to --awq; add --awq or drop it"),
    (["--fp8-rowwise", "--sq-recipe", "modelopt"], "--sq-recipe applies to --smoothquant; add it or drop the flag"),
])
def test_refusals_are_one_line(argv, message):
    with pytest.raises(UserError) as e:
        _spec(*argv)
    assert str(e.value) == message


def test_recipe_option_refusals():
    with pytest.raises(UserError, match=r"^--fp8-rowwise 'all' is not a recipe; choose mlp or meta$"):
        QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN", recipe_option="all")
    with pytest.raises(UserError, match=r"^--fp8 takes no recipe option, got 'meta'$"):
        QuantSpec.create("FP8", recipe_option="meta")


def test_cli_refusals_exit_2_before_any_work(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    base = ["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--fp8-rowwise"]
    assert main([*base, "--target", "pytorch"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "build_engine: error: --target pytorch: --fp8-rowwise has no unified checkpoint here (it writes "
        "TensorRT-LLM's MLP-only / Meta recipes; modelopt's unified FP8_PER_CHANNEL_PER_TOKEN quantizes "
        "every linear): use --target engine, or --fp8")
    assert main([*base, "--int8-weight-only"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "build_engine: error: choose one weight quantization format, got --int8-weight-only and "
        "--fp8-rowwise; --kv-cache-dtype can be combined with any one of them")
    assert not out.exists()


def test_mixture_of_experts_is_refused():
    from types import SimpleNamespace

    spec = QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN")
    with pytest.raises(UserError) as e:
        spec.format.moe.preflight(spec, SimpleNamespace(experts=4, hidden=64, inter=96, layers=2),
                                  SimpleNamespace(moe_tp=1))
    assert str(e.value) == ("--fp8-rowwise is not supported for mixture-of-experts models: TensorRT-LLM's "
                            "MixtureOfExperts has no FP8 rowwise GEMM (layers/moe.py); use --fp8 or --awq")


# ----- tensors against the restatement ---------------------------------------------------------


@pytest.mark.parametrize("recipe,tp,pp,dtype", [("mlp", 1, 1, "float16"), ("mlp", 2, 1, "bfloat16"),
                                                ("meta", 2, 2, "float16")])
def test_tensors_equal_trtllm_restatement(tmp_path, tiny_model, recipe, tp, pp, dtype):
    layers = 4
    hf_dir, model = tiny_model(num_hidden_layers=layers, intermediate_size=192)
    sd = {k: v for k, v in model.state_dict().items()}
    convert_checkpoint(hf_dir, tmp_path / "float", tp=tp, pp=pp, dtype=dtype, progress=False)
    cfg = convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, pp=pp, dtype=dtype, progress=False,
                             quant=QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN", recipe_option=recipe))
    assert cfg["quantization"]["use_meta_recipe"] == (recipe == "meta")
    torch_dtype = getattr(torch, dtype)
    per_stage = layers // pp
    quantized_layers = set(range(1, layers - 1)) if recipe == "meta" else set(range(layers))
    for r in range(tp * pp):
        pp_rank, tp_rank = divmod(r, tp)
        got = _read_rank(tmp_path / "ck" / f"rank{r}.safetensors")
        flt = _read_rank(tmp_path / "float" / f"rank{r}.safetensors")
        want_names = set(flt)
        for local in range(per_stage):
            layer = pp_rank * per_stage + local
            for lin, (hf, dim) in HF_MLP.items():
                name = f"transformer.layers.{local}.{lin}"
                if layer not in quantized_layers:
                    assert torch.equal(got[f"{name}.weight"], flt[f"{name}.weight"])
                    continue
                w = sd[f"model.layers.{layer}.mlp.{hf}.weight"].to(torch_dtype)
                w = torch.chunk(w, tp, dim=dim)[tp_rank]  # split first, then quantize
                q, s = _restated(w)
                assert got[f"{name}.weight"].dtype == torch.float8_e4m3fn
                assert torch.equal(got[f"{name}.weight"].view(torch.uint8), q.view(torch.uint8)), name
                assert got[f"{name}.per_channel_scale"].dtype == torch.float32
                assert torch.equal(got[f"{name}.per_channel_scale"], s), name
                want_names.add(f"{name}.per_channel_scale")
        assert set(got) == want_names
        for k, v in flt.items():  # attention, norms, embedding, head: the float checkpoint's
            if ".mlp." not in k:
                assert torch.equal(got[k], v), k
    result = check_dir(tmp_path / "ck")  # and TensorRT-LLM 1.x would load every rank
    assert result.exit_code == 0 and not result.findings, result.summary()
    assert result.tensors == sum(len(_read_rank(tmp_path / "ck" / f"rank{r}.safetensors"))
                                 for r in range(tp * pp))


def test_row_parallel_scales_are_per_rank(tmp_path, tiny_model):
    """mlp.proj is split by columns: each rank's scales come from its own slice (TensorRT-LLM
    quantizes after the split), so they differ between ranks."""
    hf_dir, _ = tiny_model(intermediate_size=192)
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=2, dtype="float16", progress=False,
                       quant=QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN"))
    a, b = (_read_rank(tmp_path / "ck" / f"rank{r}.safetensors")["transformer.layers.0.mlp.proj.per_channel_scale"]
            for r in range(2))
    assert a.shape == b.shape == (64,) and not torch.equal(a, b)


def test_ranks_split_over_runs_give_the_same_bytes(tmp_path, tiny_model):
    """Quantized from the weights alone, each rank is deterministic: --ranks runs and --workers
    (run in-process) write the bytes of one run."""
    hf_dir, _ = tiny_model()
    quant = QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN")
    convert_checkpoint(hf_dir, tmp_path / "one", tp=2, dtype="float16", progress=False, quant=quant)
    for r in (1, 0):
        convert_checkpoint(hf_dir, tmp_path / "split", tp=2, dtype="float16", progress=False,
                           quant=quant, ranks=[r], workers=2)
    for name in ("config.json", "rank0.safetensors", "rank1.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name


def test_cli_build_gates_quality_without_calibrating(tmp_path, tiny_model, capsys):
    """No calibration store, no calibration line; the quality gate runs and build.json records it."""
    from pathlib import Path

    hf_dir, _ = tiny_model()
    for f in (Path(__file__).resolve().parent / "golden" / "tokenizer").iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
                 "--tp", "2", "--fp8-rowwise", "meta", "--max-ppl-increase", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "calibration:" not in printed and "quality gate (FP8_PER_CHANNEL_PER_TOKEN (meta))" in printed
    assert "check: skipped" not in printed  # check/ restates the format: checked before the gate
    assert f"check: PASS {out / 'checkpoint.partial'}: LlamaForCausalLM, float16 " \
           f"FP8_PER_CHANNEL_PER_TOKEN, tp 2 pp 1, 2 rank(s): " in printed
    record = json.loads((out / "build.json").read_text())
    assert record["options"]["fp8_rowwise"] == "meta"
    assert record["options"]["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert record["options"]["quantization"]["quality_gate"]["passed"] is True
    # no calibration/ store (the ownership record and the lock are the tool's bookkeeping)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["build.json", "checkpoint"]


# ----- the reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,tp", [("mlp", 2), ("meta", 1)])
def test_reader_logits_close_to_hf(tmp_path, tiny_model, recipe, tp):
    hf_dir, model = tiny_model(num_hidden_layers=3)
    convert_checkpoint(hf_dir, tmp_path / "ck", tp=tp, dtype="float32", progress=False,
                       quant=QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN", recipe_option=recipe))
    report, passed = verify(tmp_path / "ck", model)
    # e4m3 keeps 3 mantissa bits: a few percent on random tiny models, never exact
    assert passed and 1e-4 < report["rel_err"] < 0.1, report
    assert report["argmax_agreement"] >= 0.8, report


def test_reader_kernel_is_per_token_fp8():
    from verify.kernel_table import LINEAR_KERNELS, QuantSpec as ReaderSpec

    kernel = LINEAR_KERNELS["FP8_PER_CHANNEL_PER_TOKEN"]
    spec = ReaderSpec(quant_algo="FP8_PER_CHANNEL_PER_TOKEN", raw={"clamp_val": [-1200.0, 1200.0]})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g) * torch.tensor([1.0, 100.0, 0.01])[:, None]
    w = torch.randn(32, 64, generator=g) * 0.05
    q, s = _restated(w)
    y = kernel(x, {"weight": q, "per_channel_scale": s}, spec)
    # restated: each token quantized with its own scale amax / 448
    xs = (x.abs().amax(1, keepdim=True) / 448.0)
    xq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    assert torch.allclose(y, xq @ (q.float() * s[:, None]).t(), rtol=1e-6, atol=1e-6)
    assert kernel(x, {"weight": w}, spec).equal(x @ w.t())  # a module the recipe leaves float
    with pytest.raises(UserError, match="needs a float8_e4m3fn weight beside per_channel_scale"):
        kernel(x, {"weight": w, "per_channel_scale": s}, spec)


# ----- what TensorRT-LLM declares (check/), and a hand-broken checkpoint ------------------------


def _config(recipe: str, pp: int = 1) -> dict:
    q = QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN", recipe_option=recipe).to_trtllm_quantization()
    return {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 192, "vocab_size": 100,
            "mapping": {"world_size": 2 * pp, "tp_size": 2, "pp_size": pp}, "quantization": q}


def test_declared_rowwise_blocks():
    """fp8_rowwise_quantize replaces the MLP (Fp8RowwiseGatedMLP: fc / gate / proj as fp8 weight
    [out, in] + float32 per_channel_scale [out], out per rank for the column linears, whole for
    proj) and the post-attention RmsNorm of every layer the recipe does not exclude; the meta
    recipe skips the first stage's local layer 0 and the last stage's last local layer."""
    d = declared_rank(_config("mlp"), 1)
    mlp = "transformer.layers.3.mlp."
    assert (d[mlp + "fc.weight"].shape, d[mlp + "fc.weight"].dtype) == ((96, 64), "float8_e4m3fn")
    assert (d[mlp + "gate.per_channel_scale"].shape, d[mlp + "gate.per_channel_scale"].dtype) == \
        ((96,), "float32")
    assert (d[mlp + "proj.weight"].shape, d[mlp + "proj.per_channel_scale"].shape) == ((64, 96), (64,))
    assert d["transformer.layers.3.post_layernorm.weight"].owner == "Fp8RowwiseRmsNorm"
    assert d["transformer.layers.3.input_layernorm.weight"].owner == "RmsNorm"  # excluded
    assert d["transformer.layers.0.attention.qkv.weight"].dtype == "bfloat16"   # excluded
    assert d["lm_head.weight"].dtype == "bfloat16" and "lm_head.per_channel_scale" not in d
    fp8 = {(r, i) for r in range(4) for i in range(2)
           if declared_rank(_config("meta", pp=2), r).get(f"transformer.layers.{i}.mlp.fc.weight",
                                                          None).dtype == "float8_e4m3fn"}
    assert fp8 == {(0, 1), (1, 1), (2, 0), (3, 0)}  # global layers 1 and 2 of 4, over 2 stages


def test_hand_broken_rowwise_checkpoint_fails_in_trtllm_words(tmp_path, tiny_model, capsys):
    from safetensors.torch import save_file

    hf_dir, _ = tiny_model()
    src = tmp_path / "ck"
    convert_checkpoint(hf_dir, src, tp=2, dtype="float16", progress=False,
                       quant=QuantSpec.create("FP8_PER_CHANNEL_PER_TOKEN"))
    scale = "transformer.layers.0.mlp.fc.per_channel_scale"

    def broken(edit):
        d = tmp_path / "broken"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        tensors = _read_rank(d / "rank0.safetensors")
        edit(tensors)
        save_file(tensors, d / "rank0.safetensors")
        capsys.readouterr()
        code = main(["check", str(d)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"check: FAIL {d}: LlamaForCausalLM, float16 "
                                   f"FP8_PER_CHANNEL_PER_TOKEN, tp 2 pp 1, 2 rank(s): rank 0: ")
        return lines[0].split(": rank 0: ", 1)[1]

    n = len(declared_rank(json.loads((src / "config.json").read_text()), 0))
    assert broken(lambda t: t.pop(scale)) == (
        f"RuntimeError: Required but not provided tensors: {{'{scale}'}} (1 of {n})")
    w = "transformer.layers.0.mlp.proj.weight"
    assert broken(lambda t: t.update({w: t[w].to(torch.float16)})) == (
        f"Parameter was initialized as float8_e4m3fn but set to float16 for parameter '{w}' "
        f"(Fp8RowwiseGatedMLP / Fp8RowwiseAttention (Fp8RowwiseLinear / Fp8RowwiseRowLinear)): "
        f"an fp8 / wider float mismatch the fp8 kernels cannot take")
    assert broken(lambda t: t.update({"lm_head.weight": t["lm_head.weight"].float()})) == (
        "AssertionError in preprocess_weights: lm_head.weight is float32, FP8_PER_CHANNEL_PER_TOKEN "
        "asserts the model dtype float16")
