"""Layer-wise calibration's own promises (its equality with modelopt's whole-model export is in
tests/test_quantize_convert.py): calibrate once / shard many, resume after a kill, the memory plan's
refusal, and one-line refusals of a store made from other inputs."""
from __future__ import annotations

import os

import pytest

from builders.cli import main
from common.errors import UserError
from convert_helper import convert_checkpoint
from quantize.formats import QuantSpec
from quantize.run import CalibrationRun
from quant_common import TINY, byte_tokenizer, run_killed_after_layer_1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(algo="W8A8_SQ_PER_CHANNEL", kv="int8"):
    return QuantSpec.create(algo, kv_cache_dtype=kv, calib_size=4, calib_seq_len=32,
                            calib_batch_size=2)


def _run(store, text, **kw):
    return CalibrationRun(store=store, device="cpu", calib_text=text, tokenizer=byte_tokenizer, **kw)


def _same_dirs(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_calibration_reused_for_other_layouts_equals_fresh_runs(tmp_path, calib_text, monkeypatch):
    """One calibration (tp 1) re-sharded for tp 2, tp 4 and pp 2 without recalibrating: every
    file equals a fresh run's with its own calibration."""
    import quantize.layerwise as lw
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **dict(TINY, num_hidden_layers=4))
    spec = _spec()
    store = tmp_path / "calibration"
    convert_checkpoint(hf, tmp_path / "tp1", dtype="float16", progress=False, quant=spec,
                       calibration=_run(store, calib_text))
    assert (store / "calibration.json").is_file()
    real = lw.calibrate_layerwise
    for tp, pp in ((2, 1), (4, 1), (1, 2)):
        fresh = tmp_path / f"fresh_tp{tp}_pp{pp}"
        monkeypatch.setattr(lw, "calibrate_layerwise", real)
        convert_checkpoint(hf, fresh, tp=tp, pp=pp, dtype="float16", progress=False, quant=spec,
                           calibration=_run(tmp_path / f"store_{tp}_{pp}", calib_text))

        def no_calibration(*a, **k):
            raise AssertionError("a reused calibration must not calibrate again")

        monkeypatch.setattr(lw, "calibrate_layerwise", no_calibration)
        reused = tmp_path / f"reused_tp{tp}_pp{pp}"
        convert_checkpoint(hf, reused, tp=tp, pp=pp, dtype="float16", progress=False, quant=spec,
                           calibration=_run(store, calib_text, reuse=True))
        _same_dirs(reused, fresh)


def test_reusing_a_calibration_of_other_inputs_is_refused_in_one_line(tmp_path, calib_text):
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **TINY)
    store = tmp_path / "calibration"
    convert_checkpoint(hf, tmp_path / "a", dtype="float16", progress=False, quant=_spec(),
                       calibration=_run(store, calib_text))
    with pytest.raises(UserError) as e:
        convert_checkpoint(hf, tmp_path / "b", dtype="float16", progress=False, quant=_spec(),
                           calibration=_run(store, calib_text[5000:], reuse=True))
    assert "was made from other inputs (calibration_ids differ)" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"recipe differ"):
        convert_checkpoint(hf, tmp_path / "c", dtype="float16", progress=False,
                           quant=_spec("FP8", "fp8"), calibration=_run(store, calib_text, reuse=True))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_calibration_killed_mid_way_resumes_from_the_last_finished_layer(tmp_path, calib_text,
                                                                         monkeypatch):
    """AWQ + INT8 KV (two passes replayed pass by pass, so the saved inputs hold both): a run
    SIGKILLed after layer 1 of 4 resumes at layer 2 and writes the same bytes as a run never
    interrupted."""
    import quantize.layerwise as lw
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **dict(TINY, num_hidden_layers=4, intermediate_size=640))
    (tmp_path / "text.txt").write_text(calib_text)
    store = tmp_path / "calibration"
    proc = run_killed_after_layer_1(hf, tmp_path / "out", store, tmp_path / "text.txt",
                                    dict(quant_algo="W4A16_AWQ", kv_cache_dtype="int8",
                                         awq_block_size=64, calib_size=4, calib_seq_len=32,
                                         calib_batch_size=2), dtype="float16")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in store.glob("layer_*")) == ["layer_00000.safetensors",
                                                              "layer_00001.safetensors"]
    calls = []
    real = lw._calibrate_layer

    def spy(shell, runner, i, *a):
        calls.append(runner.prefix(i))
        return real(shell, runner, i, *a)

    monkeypatch.setattr(lw, "_calibrate_layer", spy)
    spec = QuantSpec.create("W4A16_AWQ", kv_cache_dtype="int8", awq_block_size=64, calib_size=4,
                            calib_seq_len=32, calib_batch_size=2)
    convert_checkpoint(hf, tmp_path / "out", dtype="float16", progress=False, quant=spec,
                       calibration=_run(store, calib_text))
    assert calls == ["model.layers.2", "model.layers.3"]
    calls.clear()
    convert_checkpoint(hf, tmp_path / "fresh", dtype="float16", progress=False, quant=spec,
                       calibration=_run(tmp_path / "fresh_store", calib_text))
    assert len(calls) == 4
    _same_dirs(tmp_path / "out", tmp_path / "fresh")


def test_a_store_write_failing_on_its_thread_stops_the_build_in_one_line(tmp_path, calib_text,
                                                                          monkeypatch):
    """A layer's store files are written on a thread beside the next layer: a write that fails
    there (disk full at the last layer) still stops the build with the one-line error, the
    checkpoint is not written, and the store records only the layers whose files are complete
    (so a rerun resumes from there)."""
    import errno

    import quantize.store as cs
    from examples.tiny import make_tiny_model

    hf = tmp_path / "hf"
    make_tiny_model(hf, **dict(TINY, num_hidden_layers=3))
    real = cs.save

    def full_disk(tensors, path, **kw):
        if "layer_00002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, **kw)

    monkeypatch.setattr(cs, "save", full_disk)
    out, store = tmp_path / "ckpt", tmp_path / "calibration"
    with pytest.raises(UserError, match=r"calibration: No space left on device; free space or "
                                        r"choose another --output"):
        convert_checkpoint(hf, out, dtype="float16", progress=False, quant=_spec(),
                           calibration=_run(store, calib_text))
    assert not out.exists()
    man = cs.read_manifest(store)
    assert man["layers_done"] == 2 and not man["complete"]
    assert sorted(p.name for p in store.glob("layer_*.safetensors")) == [
        "layer_00000.safetensors", "layer_00001.safetensors"]


def test_memory_plan_refuses_before_any_work(tmp_path, smollm2_dir, capsys, monkeypatch):
    """A host RAM limit below the plan's calibration peak: one line with the numbers, exit 2,
    nothing written; a limit above it is printed and passes the check."""
    from quantize import memory

    monkeypatch.setenv("BUILD_ENGINE_MEMORY_LIMIT", "300M")
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--output", str(out), "--checkpoint-only",
               "--no-progress", "--fp8", "--calib-device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("build_engine: error:")]
    assert len(lines) == 1
    assert "memory plan: the calibration stage needs ~" in lines[0]
    assert "GB is available (BUILD_ENGINE_MEMORY_LIMIT)" in lines[0]
    assert "memory plan: calibration: host" in captured.out
    assert not out.exists()
    monkeypatch.setenv("BUILD_ENGINE_MEMORY_LIMIT", "64G")
    from convert_helper import preflight_conversion

    _, shape = preflight_conversion(smollm2_dir)
    stages = memory.plan(shape, QuantSpec.create("W8A8_SQ_PER_CHANNEL"), tp=1, pp=1, device="cpu")
    memory.check(stages, out, "cpu")  # passes
    assert 0.3e9 < stages[0].host < 64e9


def test_memory_plan_counts_each_worker_process_writer(tmp_path, smollm2_dir, capsys, monkeypatch):
    """--workers N writes N rank files at once, each process with its own staging buffers: the
    checkpoint stage's host figure is N writers', and a limit between one and three is refused
    at tp 3 with 3 workers (exit 2, nothing written) but not with one."""
    from convert_helper import preflight_conversion
    from quantize import memory

    _, shape = preflight_conversion(smollm2_dir, tp=3)
    one = memory.plan(shape, None, tp=3, pp=1, device="cpu")[-1]
    three = memory.plan(shape, None, tp=3, pp=1, device="cpu", workers=3)[-1]
    assert one.name == three.name == "checkpoint" and three.host == pytest.approx(3 * one.host)
    assert memory.plan(shape, None, tp=3, pp=1, device="cpu", workers=8)[-1].host == three.host
    monkeypatch.setenv("BUILD_ENGINE_MEMORY_LIMIT", str(int(2 * one.host)))
    memory.check([one], tmp_path / "x", "cpu")  # passes
    out = tmp_path / "out"
    rc = main(["--model", str(smollm2_dir), "--output", str(out), "--checkpoint-only",
               "--no-progress", "--tp", "3", "--workers", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "memory plan: the checkpoint stage needs ~" in err and not out.exists()


@pytest.mark.parametrize("algo,kv", [("W8A8_SQ_PER_CHANNEL", "int8"), ("FP8", "fp8")])
def test_padded_heads_layerwise_equal_the_whole_model_calibration(tmp_path, calib_text, algo, kv):
    """--pad-heads (9 heads / 3 KV heads over tp 2 and 4): the layer-wise calibration, padded per
    layer, writes the same files as the whole-model calibration (from_pretrained in fp32) padded
    whole."""
    import torch
    from transformers import AutoModelForCausalLM

    from examples.tiny import make_tiny_model
    from quantize.calibrate import calibrate

    hf = tmp_path / "hf"
    make_tiny_model(hf, **dict(TINY, hidden_size=576, intermediate_size=768,
                               num_attention_heads=9, num_key_value_heads=3))
    spec = _spec(algo, kv)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    for tp in (2, 4):
        kw = dict(tp=tp, pad_heads=True, dtype="float16", progress=False, quant=spec)
        convert_checkpoint(hf, tmp_path / f"whole{tp}", calibrated_model=model, **kw)
        convert_checkpoint(hf, tmp_path / f"lw{tp}", calibration=_run(tmp_path / f"s{tp}", calib_text),
                           **kw)
        _same_dirs(tmp_path / f"lw{tp}", tmp_path / f"whole{tp}")
