"""Issue 29, classes 1, 2 and 9: the model is identified by its bytes, every file read back is
checked against the digest recorded when it was written, and non-finite values are refused.
Each test reproduces what main did (noted per test) and asserts the fix: exit code, one line."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import convert.convert as cc
from builders.cli import main
from tensor_identity import restated_identity
from convert_helper import interrupt_before_rank

GOLDEN_TOKENIZER = __import__("pathlib").Path(__file__).parent / "golden" / "tokenizer"
_TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=1000, num_hidden_layers=2)
_CAL = ["--fp8", "--calib-size", "8", "--calib-seq-len", "128", "--checkpoint-only",
        "--no-progress"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [ln for ln in err if ln.startswith("build_engine: error:")]


def _model(tiny_model, seed=0, **kw):
    """A tiny llama with the golden matrix's tokenizer (so that it can be calibrated)."""
    hf_dir, _ = tiny_model(seed=seed, **{**_TINY, **kw})
    for f in GOLDEN_TOKENIZER.iterdir():
        shutil.copy(f, hf_dir / f.name)
    return hf_dir


def _flip(path, offset_from_end=100):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def _same_bytes_as(dst, src):
    """``dst`` gets ``src``'s weight bytes and keeps its own size and mtime: what main trusted."""
    st = os.stat(dst)
    shutil.copy(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- class 1: identity by content ----------------------------------------------------------------

def test_calibration_of_another_finetune_is_refused(tmp_path, tiny_model, capsys):
    """main: exit 0, the checkpoint made of model B's norms/embeddings and model A's quantized
    linears."""
    a, b = _model(tiny_model, seed=0), _model(tiny_model, seed=1)  # same config, other bytes
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "a", "--tp", "2", *_CAL)
    assert rc == 0, err
    build = json.loads((tmp_path / "a" / "build.json").read_text())
    assert len(build["inputs"]["weights_blake3"]) == 64
    rc, err = _run(capsys, "--model", b, "--output", tmp_path / "b", "--calibration",
                   tmp_path / "a" / "calibration", *_CAL)
    assert rc == 2 and len(err) == 1, err
    assert f"was calibrated from the model in {a.resolve()}" in err[0]
    assert f"not from --model {b.resolve()}" in err[0]
    assert not (tmp_path / "b" / "checkpoint").exists()


def test_weights_replaced_before_resume_are_not_mixed(tmp_path, tiny_model, capsys, monkeypatch):
    """main: the rerun kept rank 0 of model A and wrote rank 1 from model B (exit 0)."""
    a, b = _model(tiny_model, seed=0), _model(tiny_model, seed=1)
    rc, _ = _run(capsys, "--model", b, "--output", tmp_path / "clean", "--tp", "2",
                 "--checkpoint-only", "--no-progress")
    assert rc == 0
    real = interrupt_before_rank(monkeypatch)
    rc, _ = _run(capsys, "--model", a, "--output", tmp_path / "out", "--tp", "2",
                 "--checkpoint-only", "--no-progress")
    assert rc == 130
    assert (tmp_path / "out" / "checkpoint.partial" / "rank0.safetensors").is_file()
    _same_bytes_as(a / "model.safetensors", b / "model.safetensors")  # a fine-tune, same mtime
    monkeypatch.setattr(cc, "_write_rank", real)
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "out", "--tp", "2",
                   "--checkpoint-only", "--no-progress")
    assert rc == 0, err
    for r in (0, 1):
        assert (tmp_path / "out/checkpoint" / f"rank{r}.safetensors").read_bytes() == \
            (tmp_path / "clean/checkpoint" / f"rank{r}.safetensors").read_bytes()


def _tensors_identity(hf_dir):
    return restated_identity(sorted(hf_dir.glob("*.safetensors")))


def _reshard(hf_dir):
    """The same tensors in two files with an index (other file names, sizes and headers)."""
    tensors = load_file(str(hf_dir / "model.safetensors"))
    names = sorted(tensors, reverse=True)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(hf_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _resave_metadata(hf_dir):
    """The same tensors saved again with other header metadata."""
    f = hf_dir / "model.safetensors"
    save_file(load_file(str(f)), str(f), metadata={"format": "pt", "saved_by": "another tool"})


def _change_one_element(hf_dir):
    f = hf_dir / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] += 0.25
    save_file(tensors, str(f), metadata={"format": "pt"})


_CHANGES = {"resharded": _reshard, "metadata": _resave_metadata, "one-element": _change_one_element}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_calibration_reuse_knows_the_model_by_its_tensors(tmp_path, tiny_model, capsys, change):
    """main: the same tensors re-sharded into 2 files, or saved again with other header
    metadata, were refused as other inputs (model_files differ). Now they are the same model
    (the same checkpoint bytes); one changed element is another model, named by both
    identities."""
    a = _model(tiny_model)
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "a", "--tp", "2", *_CAL)
    assert rc == 0, err
    id_a = json.loads((tmp_path / "a" / "build.json").read_text())["inputs"]["weights_blake3"]
    store = json.loads((tmp_path / "a" / "calibration" / "calibration.json").read_text())
    assert id_a == store["fingerprint"]["weights"] == _tensors_identity(a)
    b = tmp_path / "b_model"
    shutil.copytree(a, b)
    _CHANGES[change](b)
    id_b = _tensors_identity(b)
    rc, err = _run(capsys, "--model", b, "--output", tmp_path / "b", "--tp", "2",
                   "--calibration", tmp_path / "a" / "calibration", *_CAL)
    if change == "one-element":
        assert id_b != id_a
        assert rc == 2 and len(err) == 1, err
        assert f"(weights blake3 {id_a[:16]})" in err[0] and f"(weights blake3 {id_b[:16]})" \
            in err[0], err[0]
        assert not (tmp_path / "b" / "checkpoint").exists()
        return
    assert rc == 0, err
    assert id_b == id_a
    assert json.loads((tmp_path / "b" / "build.json").read_text())["inputs"]["weights_blake3"] \
        == id_a
    for r in (0, 1):
        assert (tmp_path / "b/checkpoint" / f"rank{r}.safetensors").read_bytes() == \
            (tmp_path / "a/checkpoint" / f"rank{r}.safetensors").read_bytes()


@pytest.mark.parametrize("change", list(_CHANGES))
def test_resume_knows_the_model_by_its_tensors(tmp_path, tiny_model, capsys, monkeypatch, change):
    """main: a rerun after the model was re-sharded (or saved again with other header metadata)
    discarded the finished rank 0 (file names, sizes and times were in the stage's fingerprint).
    Now only rank 1 is written; one changed element still restarts the stage (both ranks written,
    none of the old model's kept)."""
    a = _model(tiny_model)
    argv = ("--output", tmp_path / "out", "--tp", "2", "--checkpoint-only", "--no-progress")
    real = interrupt_before_rank(monkeypatch)
    assert _run(capsys, "--model", a, *argv)[0] == 130
    _CHANGES[change](a)
    written = []

    def counting(model_dir, plan, path, rank, progress, **kw):
        written.append(rank)
        return real(model_dir, plan, path, rank, progress, **kw)

    monkeypatch.setattr(cc, "_write_rank", counting)
    rc, err = _run(capsys, "--model", a, *argv)
    assert rc == 0, err
    assert written == ([0, 1] if change == "one-element" else [1])
    monkeypatch.setattr(cc, "_write_rank", real)
    assert _run(capsys, "--model", a, "--output", tmp_path / "clean", *argv[2:])[0] == 0
    for r in (0, 1):
        assert (tmp_path / "out/checkpoint" / f"rank{r}.safetensors").read_bytes() == \
            (tmp_path / "clean/checkpoint" / f"rank{r}.safetensors").read_bytes()


def test_calibration_store_of_another_format_version_is_refused(tmp_path, tiny_model, capsys):
    """A store written before the identity was over tensors (format 1) holds a file identity:
    refused as another version, not misreported as another model."""
    a = _model(tiny_model)
    assert _run(capsys, "--model", a, "--output", tmp_path / "a", *_CAL)[0] == 0
    man = tmp_path / "a" / "calibration" / "calibration.json"
    man.write_text(json.dumps({**json.loads(man.read_text()), "version": 1}))
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "b", "--calibration",
                   man.parent, *_CAL)
    assert rc == 2 and len(err) == 1, err
    assert "was written by another build_engine version (store format 1, this one reads 2)" \
        in err[0]


def test_broken_quality_gate_fails_the_run(tmp_path, monkeypatch, capsys):
    """main: a gate of 0 % top-1 agreement printed and passed (exit 0) without
    --max-ppl-increase. ``measure`` is replaced by a test double returning such a result."""
    import verify.quality_gate as qg
    from builders import checks
    from common.errors import UserError

    def measure_double(*args, **kw):  # test double: the numbers of issue 29's reproduction
        return {"ppl": 60.0, "float_ppl": 50.0, "increase_pct": 20.0, "top1_agreement": 0.0,
                "tokens": 100, "vocab": 49152}

    monkeypatch.setattr(qg, "measure", measure_double)
    monkeypatch.setattr("quantize.calibrate.held_back_ids", lambda *a, **k: ([1, 2, 3], False))

    class Quant:
        recipe, name, max_ppl_increase, quant_algo = None, "FP8", None, "FP8"

        def read_calib_text(self):
            return "text"

    from common.ownership import mark_stage

    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    mark_stage(out / "checkpoint")  # the run's own staged checkpoint (the gate may remove it)
    with pytest.raises(UserError) as e:
        checks.gate_step(out, out / "checkpoint", tmp_path, Quant(), None, {})
    assert e.value.exit_code == 1
    assert "top-1 agreement with the float model 0.0% < 50%" in str(e.value)
    assert not (out / "checkpoint").exists()
    (out / "checkpoint").mkdir(parents=True)
    record = checks.gate_step(out, out / "checkpoint", tmp_path, Quant(), None, {},
                              allow_quality_loss=True)
    assert record["quality_gate"]["passed"] and (out / "checkpoint").exists()
    # a random model (float perplexity about its vocabulary) has no meaningful top-1
    assert checks.broken({"ppl": 1377.0, "float_ppl": 1378.8, "top1_agreement": 0.396,
                          "vocab": 1000}) is None
    assert "4x the float" in checks.broken({"ppl": 5000.0, "float_ppl": 1000.0,
                                            "top1_agreement": 0.9, "vocab": 1000})


# --- class 2: every file read back is checked ----------------------------------------------------

def test_damaged_calibration_store_layer_is_refused(tmp_path, tiny_model, capsys):
    """main: the flipped byte went into the new checkpoint (exit 0)."""
    a = _model(tiny_model)
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "a", *_CAL)
    assert rc == 0, err
    layer = tmp_path / "a" / "calibration" / "layer_00001.safetensors"
    _flip(layer, 3)
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "b", "--tp", "2",
                   "--calibration", tmp_path / "a" / "calibration", *_CAL)
    assert rc == 2 and len(err) == 1, err
    assert f"calibration store file {layer} does not match the BLAKE3 digest" in err[0]


def test_damaged_resume_inputs_are_refused(tmp_path):
    """main: a damaged inputs file of an interrupted calibration was loaded as is."""
    import torch

    from common.errors import UserError
    from quantize import store as cstore

    store = tmp_path / "calibration"
    cstore.begin(store, {"weights": "w"})
    cstore.finish_layer(store, 0, {"x": torch.ones(4)}, [[torch.arange(6.0).reshape(2, 3)]])
    assert cstore.load_inputs(store, "cpu")[0][0].tolist() == [[0, 1, 2], [3, 4, 5]]
    _flip(store / "inputs_00001.safetensors", 2)
    with pytest.raises(UserError, match="inputs_00001.safetensors does not match the BLAKE3"):
        cstore.load_inputs(store, "cpu")


def test_damaged_finished_rank_is_refused_on_resume(tmp_path, tiny_model, capsys, monkeypatch):
    """main: the damaged rank 0 was kept and promoted (exit 0)."""
    a = _model(tiny_model)
    real = interrupt_before_rank(monkeypatch)
    argv = ("--model", a, "--output", tmp_path / "out", "--tp", "2", "--checkpoint-only",
            "--no-progress")
    assert _run(capsys, *argv)[0] == 130
    rank0 = tmp_path / "out" / "checkpoint.partial" / "rank0.safetensors"
    _flip(rank0)
    monkeypatch.setattr(cc, "_write_rank", real)
    rc, err = _run(capsys, *argv)
    assert rc == 2 and len(err) == 1, err
    assert f"{rank0} does not match the BLAKE3 digest recorded when it was written" in err[0]
    assert not (tmp_path / "out" / "checkpoint").exists()


@pytest.mark.parametrize("kept", ["both", "record", "build.json"])
@pytest.mark.parametrize("name", ["rank1.safetensors", "config.json"])
def test_from_checkpoint_checks_recorded_digests(tmp_path, tiny_model, capsys, monkeypatch, name,
                                                 kept):
    """main: the changed file went on to the engine stage (exit 3 here); a byte changed in place
    passed the ownership record's size check when no build.json was beside it (a run that ended
    after its checkpoint). The checkpoint is hashed once: against the ownership record when there
    is one ("both", "record"), else against build.json."""
    import builders.manifest as manifest
    from common.ownership import RECORD

    a = _model(tiny_model)
    out = tmp_path / "out"
    assert _run(capsys, "--model", a, "--output", out, "--tp", "2", "--checkpoint-only",
                "--no-progress")[0] == 0
    if kept != "both":
        (out / ("build.json" if kept == "record" else RECORD)).unlink()
    target = out / "checkpoint" / name
    if name == "config.json":  # same size: only a digest tells
        text = target.read_text()
        assert '"rotary_base": 10000.0' in text
        target.write_text(text.replace('"rotary_base": 10000.0', '"rotary_base": 10001.0'))
    else:
        _flip(target)
    listed = []
    real = manifest.check_listed
    monkeypatch.setattr(manifest, "check_listed", lambda d: listed.append(d) or real(d))  # spy
    rc, err = _run(capsys, "--from-checkpoint", out / "checkpoint", "--output", out,
                   "--triton-target", "none", "--no-progress")
    assert rc == 2 and len(err) == 1, err
    if kept == "build.json":
        assert f"{target.resolve()} does not match its BLAKE3 digest in {out.resolve()}/build.json" \
            in err[0], err[0]
        assert listed
    else:
        assert err[0] == (f"build_engine: error: --from-checkpoint: {target} does not match its "
                          f"BLAKE3 digest in {out / RECORD}: it was changed or damaged after it "
                          f"was written; rerun the build that wrote it")
        assert not listed  # the plan's check stopped it; build.json is not read again


# --- class 9: silent numeric damage --------------------------------------------------------------

def _poison(hf_dir, name, value, count=3):
    f = hf_dir / "model.safetensors"
    tensors = load_file(str(f))
    flat = tensors[name].reshape(-1)
    flat[:count] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_nan_weights_are_refused_unless_allowed(tmp_path, tiny_model, capsys):
    """main: NaN weights converted silently (exit 0)."""
    a = _model(tiny_model, dtype=__import__("torch").float16)
    name = "model.layers.1.mlp.up_proj.weight"
    _poison(a, name, np.nan)
    argv = ("--model", a, "--tp", "2", "--checkpoint-only", "--no-progress")
    rc, err = _run(capsys, *argv, "--output", tmp_path / "out")
    assert rc == 2 and len(err) == 1, err
    assert f"tensor {name} of the model holds 3 NaN/Inf value(s)" in err[0]
    assert not (tmp_path / "out" / "checkpoint").exists()
    rc, err = _run(capsys, *argv, "--output", tmp_path / "ok", "--allow-nonfinite")
    assert rc == 0, err


@pytest.mark.parametrize("fmt", [[], ["--fp8", "--calib-size", "2", "--calib-seq-len", "16"]],
                         ids=["float", "fp8"])
def test_nan_weights_are_refused_on_target_pytorch(tmp_path, tiny_model, capsys, fmt):
    """main: --target pytorch copied NaN weights into hf_quantized/ (exit 0), and FP8 calibrated
    on them; now refused as on the engine target, before calibration for a calibrated format."""
    a = _model(tiny_model, dtype=__import__("torch").float16)
    name = "model.layers.0.self_attn.k_proj.weight"
    _poison(a, name, np.inf, count=2)
    argv = ("--model", a, "--target", "pytorch", "--checkpoint-only", "--no-progress", *fmt)
    rc, err = _run(capsys, *argv, "--output", tmp_path / "out")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"build_engine: error: tensor {name} of the model holds 2 NaN/Inf value(s): "
                      f"the weights are damaged; re-download them, or pass --allow-nonfinite to "
                      f"convert them as they are")
    assert not [p.name for p in (tmp_path / "out").glob("hf_quantized*")]
    if not fmt:
        rc, err = _run(capsys, *argv, "--output", tmp_path / "ok", "--allow-nonfinite")
        assert rc == 0, err
        assert (tmp_path / "ok" / "hf_quantized" / "model.safetensors").is_file()


def test_fp16_overflow_is_refused(tmp_path, tiny_model, capsys):
    """main: 1e6 became inf in the float16 checkpoint (exit 0)."""
    a = _model(tiny_model)  # float32: --dtype auto writes float16
    name = "model.layers.0.self_attn.o_proj.weight"
    _poison(a, name, 1e6, count=2)
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "out", "--tp", "2",
                   "--checkpoint-only", "--no-progress")
    assert rc == 2 and len(err) == 1, err
    assert f"casting tensor {name} from float32 to float16 overflows: 2 value(s)" in err[0]
    assert not (tmp_path / "out" / "checkpoint").exists()
    rc, err = _run(capsys, "--model", a, "--output", tmp_path / "bf16", "--tp", "2",
                   "--dtype", "bfloat16", "--checkpoint-only", "--no-progress")
    assert rc == 0, err


def test_verify_with_nan_fails(tmp_path, tiny_model, capsys):
    """issue 29: `--verify` reported `rel err nan` and passed; it must be a mismatch (exit 1)."""
    a = _model(tiny_model)
    _poison(a, "model.layers.0.mlp.down_proj.weight", np.nan)
    rc = main([str(x) for x in ("--model", a, "--output", tmp_path / "out", "--checkpoint-only",
                                "--no-progress", "--allow-nonfinite", "--verify")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "verify: MISMATCH" in out and "rel err nan" in out


def test_damaged_engine_of_another_run_is_refused_before_promotion(tmp_path):
    """main: a rank engine changed in engines.partial/ between two --ranks runs was promoted and
    the Triton repository filled for it. Engines built by the TEST DOUBLE RecordingFakeTrtllm
    (engine_fakes.py)."""
    from builders.engine import build_engines
    from common.errors import UserError
    from engine_fakes import RecordingFakeTrtllm, make_checkpoint

    ckpt = make_checkpoint(tmp_path, tp=2)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0").ok
    rank0 = engines.with_name("engines.partial") / "rank0.engine"
    _flip(rank0, 1)
    with pytest.raises(UserError) as e:
        build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="1")
    assert e.value.exit_code == 2
    assert f"{rank0} does not match the BLAKE3 digest recorded when it was built" in str(e.value)
    assert not engines.exists()
