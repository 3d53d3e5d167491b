"""Issue 29, class 8: the safetensors reader checks headers and files as strictly as the safetensors
library (and the index's own map), refusing in one line, exit 2, before any output is written.
Each test failed on main: the file was accepted (and converted, exit 0)."""
from __future__ import annotations

import json
import os
import struct

import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from builders.cli import main


def _convert(capsys, hf_dir, out):
    rc = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [ln for ln in err if ln.startswith("build_engine: error:")]


def _rewrite(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _parts(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_integer_dtype_in_a_float_model_is_refused(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    f = hf_dir / "model.safetensors"
    header, data = _parts(f)
    name = "model.norm.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "I32"  # same size: only the header lies
    _rewrite(f, header, data)
    rc, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert rc == 2 and len(err) == 1
    assert f"tensor {name} in {f} has dtype I32 but config.json declares a float32 model" in err[0]
    assert not (tmp_path / "out").exists()


def test_overlapping_offsets_are_refused_as_safetensors_does(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    f = hf_dir / "model.safetensors"
    header, data = _parts(f)
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (a0, a1), first = spans[0]
    (b0, b1), second = spans[1]
    assert b1 - b0 == a1 - a0, "the test needs two tensors of one size"
    header[second]["data_offsets"] = [a0, a1]  # second now reads first's bytes
    _rewrite(f, header, data)
    with pytest.raises(Exception):  # the safetensors library refuses it too
        with safe_open(str(f), framework="numpy") as g:
            g.get_tensor(second)
    rc, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert rc == 2 and len(err) == 1
    assert f"{f} is not a readable safetensors file" in err[0] and "overlaps tensor" in err[0]
    assert not (tmp_path / "out").exists()


def test_tensor_in_two_files_is_refused_naming_both(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    with safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as g:
        norm = g.get_tensor("model.norm.weight")
    save_file({"model.norm.weight": norm * 2}, str(hf_dir / "zz-extra.safetensors"))
    rc, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert rc == 2 and len(err) == 1
    assert (f"tensor model.norm.weight is in both {hf_dir / 'model.safetensors'} and "
            f"{hf_dir / 'zz-extra.safetensors'}") in err[0]


def test_index_map_is_honoured(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model(max_shard_size="100KB", num_hidden_layers=3)
    index = hf_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    files = sorted(set(doc["weight_map"].values()))
    name = "model.norm.weight"
    other = next(f for f in files if f != doc["weight_map"][name])
    doc["weight_map"][name] = other  # the map says another shard than the one holding it
    index.write_text(json.dumps(doc))
    rc, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert rc == 2 and len(err) == 1
    assert f"maps tensor {name} to {other} but it is in" in err[0]


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/abs.safetensors", "link"])
def test_index_entries_stay_in_the_model_directory(tmp_path, tiny_model, capsys, entry):
    hf_dir, _ = tiny_model(max_shard_size="100KB", num_hidden_layers=3)
    index = hf_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    victim = sorted(set(doc["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(hf_dir / victim, outside / victim)
    if entry == "link":  # a symlink in the model directory that leads out of it
        (hf_dir / "link").symlink_to(outside)
        entry = f"link/{victim}"
    for k, v in doc["weight_map"].items():
        if v == victim:
            doc["weight_map"][k] = entry
    index.write_text(json.dumps(doc))
    rc, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert rc == 2 and len(err) == 1
    assert f"names {entry!r}, which" in err[0] and "outside" in err[0]
    assert not (tmp_path / "out").exists()
