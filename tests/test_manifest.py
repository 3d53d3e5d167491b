"""builders/manifest.py: DIR/build.json — hashes, versions, options, timings, outputs."""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import pytest

from builders.engine import EngineOptions
from builders.manifest import MANIFEST_NAME, sha256_file, software_versions, write_manifest


def _dist(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture
def build_dir(tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model-00001-of-00002.safetensors").write_bytes(os.urandom(3000))
    (model / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1000))
    (model / "tokenizer.json").write_text("{}")
    (model / "README.md").write_text("not an input file")
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "config.json").write_text("{}")
    (out / "checkpoint" / "rank0.safetensors").write_bytes(os.urandom(5000))
    (out / "engines" / "logs").mkdir(parents=True)
    (out / "engines" / "rank0.engine").write_bytes(os.urandom(777))
    (out / "engines" / "logs" / "rank0.log").write_text("log\n")
    (out / "triton" / "tensorrt_llm" / "1").mkdir(parents=True)
    (out / "triton" / "tensorrt_llm" / "config.pbtxt").write_text('name: "tensorrt_llm"\n')
    return model, out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_streamed_sha256_matches_hashlib(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(100_003))
    assert sha256_file(p) == _sha(p)
    assert sha256_file(p, chunk_size=7) == _sha(p)   # many partial chunks
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_manifest_contents(build_dir):
    model, out = build_dir
    opts = EngineOptions(max_batch_size=8)
    path = write_manifest(out, inputs={"model_dir": model, "model": "tiny-llama"},
                          options={"tp": 2, "output": out, "engine": opts,
                                   "cli": argparse.Namespace(force=True)},
                          stage_timings={"checkpoint": 1.23456, "engines": 2.0, "triton": None},
                          outputs_root=out)
    assert path == out / MANIFEST_NAME
    m = json.loads(path.read_text())
    assert sorted(m) == ["created_utc", "inputs", "options", "outputs", "schema", "stage_timings_s",
                         "versions"]
    # inputs: each shard (and config/tokenizer) with its sha256; README is not an input
    assert m["inputs"]["model_dir"] == str(model.resolve())
    assert m["inputs"]["model"] == "tiny-llama"
    files = {f["path"]: f for f in m["inputs"]["model_files"]}
    assert sorted(files) == ["config.json", "model-00001-of-00002.safetensors",
                             "model-00002-of-00002.safetensors", "tokenizer.json"]
    for name, f in files.items():
        assert f["sha256"] == _sha(model / name) and f["size"] == (model / name).stat().st_size
    # every option, as JSON
    assert m["options"]["tp"] == 2 and m["options"]["output"] == str(out)
    assert m["options"]["engine"] == opts.as_dict()
    assert m["options"]["engine"]["max_batch_size"] == 8
    assert m["options"]["cli"] == {"force": True}
    assert m["stage_timings_s"] == {"checkpoint": 1.235, "engines": 2.0, "triton": None}
    # every output file except build.json itself, with sha256 and size, sorted
    outs = m["outputs"]["files"]
    assert [f["path"] for f in outs] == sorted(f["path"] for f in outs)
    assert [f["path"] for f in outs] == [
        "checkpoint/config.json", "checkpoint/rank0.safetensors", "engines/logs/rank0.log",
        "engines/rank0.engine", "triton/tensorrt_llm/config.pbtxt"]
    for f in outs:
        p = out / f["path"]
        assert f["sha256"] == _sha(p) and f["size"] == p.stat().st_size
    assert m["outputs"]["root"] == str(out.resolve())


def test_versions_present():
    v = software_versions()
    for key in ("python", "torch", "transformers", "modelopt", "tensorrt_llm"):
        assert key in v
    assert v["python"] == platform.python_version()
    assert v["torch"] == _dist("torch") and v["torch"] is not None
    assert v["transformers"] == _dist("transformers") and v["transformers"] is not None
    assert v["modelopt"] == _dist("nvidia-modelopt")
    assert v["tensorrt_llm"] == (_dist("tensorrt_llm") or _dist("tensorrt-llm"))  # None here


def test_deterministic_key_order_and_rewrite(build_dir):
    model, out = build_dir
    kw = dict(inputs={"model_dir": model}, options={"b": 1, "a": {"z": 1, "y": 2}},
              stage_timings={"engines": 1, "checkpoint": 2})
    text1 = write_manifest(out, **kw).read_text()
    data = json.loads(text1)
    assert text1 == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert list(data["options"]) == ["a", "b"] and list(data["options"]["a"]) == ["y", "z"]
    text2 = write_manifest(out, **kw).read_text()
    strip = lambda t: {k: v for k, v in json.loads(t).items() if k != "created_utc"}  # noqa: E731
    assert strip(text1) == strip(text2)           # build.json never lists itself
    assert not any(p.name.startswith(".build.json") for p in out.iterdir())


def test_background_input_hashing_gives_the_same_manifest(build_dir):
    from builders.manifest import InputHashing, build_manifest

    model, out = build_dir
    inputs = {"model": "x", "model_dir": str(model)}
    direct = build_manifest(out, inputs=inputs, options={}, stage_timings={})
    background = build_manifest(out, inputs=InputHashing(inputs), options={}, stage_timings={})
    assert background["inputs"] == direct["inputs"]
    assert [f["sha256"] for f in direct["inputs"]["model_files"]] == [
        _sha(model / n) for n in ("config.json", "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors", "tokenizer.json")]
    assert background["outputs"] == direct["outputs"]


def test_background_input_hashing_reraises_its_error(tmp_path, monkeypatch):
    import builders.manifest as M

    def broken(inputs, **kw):
        raise OSError("disk gone")

    monkeypatch.setattr(M, "describe_inputs", broken)
    with pytest.raises(OSError, match="disk gone"):
        M.InputHashing({"model_dir": str(tmp_path)}).result()


def test_rank_files_hashed_by_the_writer_not_read_back(tmp_path, tiny_model, monkeypatch):
    """build_engine --checkpoint-only: build.json's sha256 of each rank file is the one the
    writer took while writing it (a hash per O_DIRECT staging buffer): it equals hashlib over
    the file's bytes and the file is never read back for it; a file changed afterwards is hashed
    from disk again (the writer's digest is tied to its size and mtime)."""
    import builders.manifest as M
    from builders.cli import main
    from convert import digests

    hf_dir, _ = tiny_model()
    read_back = []
    real = M.sha256_file
    monkeypatch.setattr(M, "sha256_file", lambda p, *a, **k: read_back.append(Path(p).name)
                        or real(p, *a, **k))
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--tp", "2", "--output", str(out), "--no-progress",
                 "--checkpoint-only"]) == 0
    files = {e["path"]: e for e in json.loads((out / MANIFEST_NAME).read_text())["outputs"]["files"]}
    ranks = [out / "checkpoint" / f"rank{r}.safetensors" for r in range(2)]
    for p in ranks:
        assert files[f"checkpoint/{p.name}"]["sha256"] == _sha(p)
        assert files[f"checkpoint/{p.name}"]["size"] == p.stat().st_size
    if digests.known(ranks[0]) is None:
        pytest.skip(f"{tmp_path} does not take O_DIRECT: rank files go through the page cache")
    assert not [n for n in read_back if n.startswith("rank")], read_back
    assert "config.json" in read_back  # small files the writer did not write: read as before

    with open(ranks[0], "r+b") as f:  # same size, new bytes: the recorded digest no longer holds
        f.write(b"\0" * 8)
    assert digests.known(ranks[0]) is None
    write_manifest(out, inputs={}, options={}, stage_timings={})
    files = {e["path"]: e for e in json.loads((out / MANIFEST_NAME).read_text())["outputs"]["files"]}
    assert files["checkpoint/rank0.safetensors"]["sha256"] == _sha(ranks[0])
