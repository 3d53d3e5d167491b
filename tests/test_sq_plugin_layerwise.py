"""TensorRT-LLM's plugin SmoothQuant (``--smoothquant``'s default recipe) calibrated layer by layer
from the safetensors (quantize/sq_layerwise.py, the default) against the whole-model calibration
(``quantize.sq_reference.calibrate_plugin``: the model loaded whole with from_pretrained, ranges by
forward hooks over the whole forward): every rank file and config.json byte for byte. The
whole-model path itself is checked against an independent rewrite of TensorRT-LLM's formulas in
tests/test_smoothquant_plugin.py. Also: a plugin calibration store reused for another tp equals a
fresh run, and a calibration killed mid-way resumes to the same bytes."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from convert_helper import convert_checkpoint
from quantize.formats import QuantSpec
from quantize.run import CalibrationRun
from quantize.sq_reference import calibrate_plugin
from quant_common import TINY, byte_tokenizer, run_killed_after_layer_1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
            "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN")
CALIB = dict(calib_size=4, calib_seq_len=64, calib_batch_size=2)


def _run(store, text, tokenizer=byte_tokenizer, **kw):
    return CalibrationRun(store=store, device="cpu", calib_text=text, tokenizer=tokenizer, **kw)


def assert_same_checkpoints(got, want):
    """Same files, byte for byte; on a difference, which tensors differ and where."""
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for n in names:
        if (got / n).read_bytes() == (want / n).read_bytes():
            continue
        if n.endswith(".safetensors"):
            a, b = load_file(got / n), load_file(want / n)
            assert a.keys() == b.keys(), (n, sorted(set(a) ^ set(b)))
            bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                   or not torch.equal(a[k], b[k])]
            raise AssertionError(f"{n}: {len(bad)} tensors differ, e.g. {bad[:4]}")
        raise AssertionError(f"{n} differs: {(got / n).read_text()[:2000]}")


def layerwise_equals_whole(tmp_path, hf_dir, spec, text, tp, tokenizer=byte_tokenizer, **kw):
    """Convert with the whole-model calibration and with the layer-wise one; the same bytes, and
    the same report (alphas, search errors). The layer-wise side runs its fused weight passes in
    blocks of 5000 elements (sq_int8.BLOCK_ELEMENTS, not a multiple of any row: these models are
    smaller than the default block), so the blocking is shown not to change a bit either."""
    import quantize.sq_int8 as sq

    cal = calibrate_plugin(hf_dir, spec, text, tokenizer=tokenizer, progress=False)
    whole, lw = tmp_path / f"whole-tp{tp}", tmp_path / f"lw-tp{tp}"
    report_whole, report_lw = {}, {}
    convert_checkpoint(hf_dir, whole, tp=tp, quant=spec, calibrated_model=cal, progress=False,
                       quant_report=report_whole, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sq, "BLOCK_ELEMENTS", 5000)
        convert_checkpoint(hf_dir, lw, tp=tp, quant=spec, progress=False, quant_report=report_lw,
                           calibration=_run(tmp_path / f"store-tp{tp}", text, tokenizer), **kw)
    assert_same_checkpoints(lw, whole)
    assert report_lw == report_whole
    return lw, report_lw


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("algo", VARIANTS)
def test_plugin_variants_layerwise_equal_whole_model(tmp_path, calib_text, algo, tp):
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **TINY)  # 8 heads, 4 kv heads: TensorRT-LLM's GQA qkv branch
    spec = QuantSpec.create(algo, **CALIB)
    out, report = layerwise_equals_whole(tmp_path, hf, spec, calib_text, tp)
    assert report["alphas"] == [0.75, 0.75]
    # the store keeps one int8 weight per linear (the recipe's mode), never both
    store = load_file(tmp_path / f"store-tp{tp}" / "layer_00000.safetensors")
    assert store["qkv.weight"].dtype == torch.int8 and "qkv.w_col" not in store


@pytest.mark.parametrize("family,algo,alpha,heads", [
    ("llama", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "auto", {}),     # GQA, per-layer search
    ("qwen2", "W8A8_SQ_PER_TENSOR_PLUGIN", 0.8, {"num_key_value_heads": 8}),  # MHA, q/k/v bias
    ("qwen2", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "auto", {"num_key_value_heads": 8}),
])
def test_auto_and_int8_kv_cache_layerwise_equal_whole_model(tmp_path, calib_text, family, algo,
                                                            alpha, heads):
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, family=family, **(TINY | heads))
    spec = QuantSpec.create(algo, kv_cache_dtype="int8", smoothquant_alpha=alpha, **CALIB)
    out, report = layerwise_equals_whole(tmp_path, hf, spec, calib_text, 2)
    assert "transformer.layers.1.attention.kv_cache_scaling_factor" in load_file(out / "rank1.safetensors")
    if alpha == "auto":
        assert len(report["alpha_search"]["per_layer_error"]) == 2
        q = json.loads((out / "config.json").read_text())["quantization"]
        assert q["smoothquant_val"] == round(sum(report["alphas"]) / 2, 4)


def test_padded_llama_example_layerwise_equals_whole_model(tmp_path, smollm2_dir, shared_text):
    """The ``llama`` example: SmolLM2-135M (bf16 safetensors, 9 heads / 3 kv heads) at tp 2 with
    its heads padded to 12 / 4, the default recipe plus INT8 KV cache."""
    from transformers import AutoTokenizer

    text = shared_text("shakespeare.txt", 4000)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = QuantSpec.create("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", kv_cache_dtype="int8",
                            calib_size=2, calib_seq_len=32, calib_batch_size=1)
    out, _ = layerwise_equals_whole(tmp_path, smollm2_dir, spec, text, 2, tokenizer=tok,
                                    pad_heads=True, dtype="float16")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (12, 4)


def test_plugin_calibration_reused_for_tp2_equals_a_fresh_run(tmp_path, calib_text, monkeypatch):
    """One plugin calibration (tp 1, --smoothquant auto + INT8 KV) re-sharded for tp 2 without
    recalibrating equals a tp 2 run with its own calibration, report included."""
    import quantize.layerwise as lw
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **dict(TINY, num_hidden_layers=4))
    spec = QuantSpec.create(VARIANTS[1], kv_cache_dtype="int8", smoothquant_alpha="auto", **CALIB)
    store = tmp_path / "calibration"
    convert_checkpoint(hf, tmp_path / "tp1", progress=False, quant=spec,
                       calibration=_run(store, calib_text))
    fresh_report, reused_report = {}, {}
    convert_checkpoint(hf, tmp_path / "fresh", tp=2, progress=False, quant=spec,
                       quant_report=fresh_report, calibration=_run(tmp_path / "s2", calib_text))

    def no_calibration(*a, **k):
        raise AssertionError("a reused calibration must not calibrate again")

    monkeypatch.setattr(lw, "calibrate_layerwise", no_calibration)
    convert_checkpoint(hf, tmp_path / "reused", tp=2, progress=False, quant=spec,
                       quant_report=reused_report, calibration=_run(store, calib_text, reuse=True))
    assert_same_checkpoints(tmp_path / "reused", tmp_path / "fresh")
    assert reused_report == fresh_report and len(reused_report["alphas"]) == 4
    with pytest.raises(Exception, match=r"recipe differ"):  # another plugin variant: refused
        convert_checkpoint(hf, tmp_path / "other", tp=2, progress=False,
                           quant=QuantSpec.create(VARIANTS[0], kv_cache_dtype="int8",
                                                  smoothquant_alpha="auto", **CALIB),
                           calibration=_run(store, calib_text, reuse=True))


def test_plugin_calibration_killed_mid_way_resumes_from_the_last_finished_layer(tmp_path, calib_text,
                                                                                monkeypatch):
    """A plugin calibration SIGKILLed after layer 1 of 4 resumes at layer 2 (from the saved
    layer inputs) and writes the same bytes as a run never interrupted."""
    import quantize.sq_layerwise as sl
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **dict(TINY, num_hidden_layers=4))
    (tmp_path / "text.txt").write_text(calib_text)
    store = tmp_path / "calibration"
    algo = VARIANTS[3]
    proc = run_killed_after_layer_1(hf, tmp_path / "out", store, tmp_path / "text.txt",
                                    dict(quant_algo=algo, calib_size=4, calib_seq_len=64,
                                         calib_batch_size=2))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in store.glob("layer_*")) == ["layer_00000.safetensors",
                                                              "layer_00001.safetensors"]
    calls = []
    real = sl.calibrate_plugin_layer

    def spy(runner, i, *a):
        calls.append(i)
        return real(runner, i, *a)

    monkeypatch.setattr(sl, "calibrate_plugin_layer", spy)
    spec = QuantSpec.create(algo, **CALIB)
    convert_checkpoint(hf, tmp_path / "out", progress=False, quant=spec,
                       calibration=_run(store, calib_text))
    assert calls == [2, 3]
    calls.clear()
    convert_checkpoint(hf, tmp_path / "fresh", progress=False, quant=spec,
                       calibration=_run(tmp_path / "fresh_store", calib_text))
    assert calls == [0, 1, 2, 3]
    assert_same_checkpoints(tmp_path / "out", tmp_path / "fresh")


def test_memory_plan_counts_the_plugin_recipe_layer_by_layer(tmp_path, smollm2_dir, capsys,
                                                             monkeypatch):
    """build_engine --smoothquant prints (and checks against) the layer-wise calibration figure,
    not the whole-model one: a limit below it is refused in one line before any work."""
    from builders.cli import main
    from convert_helper import preflight_conversion
    from quantize import memory

    spec = QuantSpec.create(VARIANTS[0], calib_size=4, calib_seq_len=64)
    _, shape = preflight_conversion(smollm2_dir, quant=spec)
    lw = memory.plan(shape, spec, tp=1, pp=1, device="cpu")[0].host
    whole = memory.plan(shape, spec, tp=1, pp=1, device="cpu", layerwise=False)[0].host
    assert lw < whole / 1.5
    monkeypatch.setenv("BUILD_ENGINE_MEMORY_LIMIT", str(int(lw * 0.9)))
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--output", str(out), "--checkpoint-only",
               "--no-progress", "--smoothquant", "--calib-device", "cpu", "--calib-size", "4",
               "--calib-seq-len", "64"])
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("build_engine: error:")]
    assert len(lines) == 1 and f"the calibration stage needs ~{lw / 1e9:.2f} GB" in lines[0]


def test_a_calibrated_layer_is_freed_without_a_garbage_collection(tmp_path, calib_text):
    """The layer loop skips gc.collect for the plugin recipe (a full collection costs seconds per
    layer): the materialised layer and its float weights must then be freed by reference counting
    alone, or memory would grow with depth."""
    import gc
    import weakref

    from examples.tiny import make_tiny_model
    from convert.source import SourceCheckpoint
    from quantize.layerwise import LayerRunner, calib_batches
    from quantize.sq_layerwise import calibrate_plugin_layer

    hf = tmp_path / "hf"
    make_tiny_model(hf, **TINY)
    spec = QuantSpec.create(VARIANTS[0], smoothquant_alpha="auto", **CALIB)
    runner = LayerRunner(hf, SourceCheckpoint(hf), calib_batches(spec, calib_text, byte_tokenizer),
                         torch.device("cpu"), modelopt=False)
    refs = []
    real = runner.materialise

    def materialise(i):
        layer = real(i)
        refs.extend(weakref.ref(t) for t in (layer, layer.mlp.up_proj.weight))
        return layer

    runner.materialise = materialise
    gc.disable()
    try:
        state, outs = calibrate_plugin_layer(runner, 0, spec, [runner.first_inputs])
        assert refs and all(r() is None for r in refs)
    finally:
        gc.enable()
