"""builders/manifest.py: DIR/build.json — BLAKE3 digests, versions, options, timings, outputs."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import blake3
import pytest

from builders.engine import EngineOptions
from builders.manifest import MANIFEST_NAME, file_digest, write_manifest
from common.versions import software_versions

# BLAKE3 of no bytes: the reference test vector (BLAKE3 spec, test_vectors.json, input_len 0),
# what `b3sum` prints for an empty file
B3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


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


def _b3(p: Path) -> str:
    """BLAKE3 of the file's bytes, one-shot over what is on disk (independent of the streaming)."""
    return blake3.blake3(p.read_bytes()).hexdigest()


def test_streamed_digest_is_blake3_of_the_bytes(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(100_003))
    assert file_digest(p) == _b3(p)
    assert file_digest(p, chunk_size=7) == _b3(p)     # many partial chunks
    assert file_digest(p, chunk_size=1024) == _b3(p)  # BLAKE3's chunk size: a tail of 675 bytes
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_digest(empty) == _b3(empty) == B3_EMPTY


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
    assert m["schema"] == 3  # 3: model safetensors by tensors, 2: BLAKE3 (1 had sha256)
    # inputs: each shard (and config/tokenizer) with its BLAKE3 digest; README is not an input
    assert m["inputs"]["model_dir"] == str(model.resolve())
    assert m["inputs"]["model"] == "tiny-llama"
    files = {f["path"]: f for f in m["inputs"]["model_files"]}
    assert sorted(files) == ["config.json", "model-00001-of-00002.safetensors",
                             "model-00002-of-00002.safetensors", "tokenizer.json"]
    for name, f in files.items():
        assert sorted(f) == ["blake3", "path", "size"]
        assert f["blake3"] == _b3(model / name) and f["size"] == (model / name).stat().st_size
    # every option, as JSON
    assert m["options"]["tp"] == 2 and m["options"]["output"] == str(out)
    assert m["options"]["engine"] == opts.as_dict()
    assert m["options"]["engine"]["max_batch_size"] == 8
    assert m["options"]["cli"] == {"force": True}
    assert m["stage_timings_s"] == {"checkpoint": 1.235, "engines": 2.0, "triton": None}
    # every output file except build.json itself, with BLAKE3 digest and size, sorted
    outs = m["outputs"]["files"]
    assert [f["path"] for f in outs] == sorted(f["path"] for f in outs)
    assert [f["path"] for f in outs] == [
        "checkpoint/config.json", "checkpoint/rank0.safetensors", "engines/logs/rank0.log",
        "engines/rank0.engine", "triton/tensorrt_llm/config.pbtxt"]
    for f in outs:
        p = out / f["path"]
        assert sorted(f) == ["blake3", "path", "size"]
        assert f["blake3"] == _b3(p) and f["size"] == p.stat().st_size
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
    assert [f["blake3"] for f in direct["inputs"]["model_files"]] == [
        _b3(model / n) for n in ("config.json", "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors", "tokenizer.json")]
    assert background["outputs"] == direct["outputs"]


def test_model_safetensors_are_listed_by_their_tensors(tmp_path):
    """A model's safetensors files are listed by the identity of their tensors
    (``tensors_blake3``), the model by the identity of all of them (``weights_blake3``): the same
    tensors in one file or two, with other header metadata, give the same model identity; one
    changed element another. Checked against tests/tensor_identity.py's restatement."""
    import numpy as np
    from safetensors.numpy import save_file

    from builders.manifest import describe_inputs
    from tensor_identity import restated_identity

    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((4, 6)).astype(np.float16),
               "a.weight": rng.standard_normal((3,)).astype(np.float32)}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    save_file(tensors, str(one / "model.safetensors"), metadata={"format": "pt"})
    save_file({"a.weight": tensors["a.weight"]}, str(two / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": tensors["b.weight"]}, str(two / "model-00002-of-00002.safetensors"),
              metadata={"saved_by": "another tool"})
    got = {d: describe_inputs({"model_dir": d}) for d in (one, two)}
    for d, inputs in got.items():
        for f in inputs["model_files"]:
            assert sorted(f) == ["path", "size", "tensors_blake3"]
            assert f["tensors_blake3"] == restated_identity([d / f["path"]])
    assert got[one]["weights_blake3"] == got[two]["weights_blake3"] == \
        restated_identity([one / "model.safetensors"])
    tensors["b.weight"][2, 3] += 1
    save_file(tensors, str(one / "model.safetensors"), metadata={"format": "pt"})
    assert describe_inputs({"model_dir": one})["weights_blake3"] != got[two]["weights_blake3"]


def test_background_input_hashing_reraises_its_error(tmp_path, monkeypatch):
    import builders.manifest as M

    def broken(inputs, **kw):
        raise OSError("disk gone")

    monkeypatch.setattr(M, "describe_inputs", broken)
    with pytest.raises(OSError, match="disk gone"):
        M.InputHashing({"model_dir": str(tmp_path)}).result()


def test_rank_files_hashed_by_the_writer_not_read_back(tmp_path, tiny_model, monkeypatch):
    """build_engine --checkpoint-only: build.json's BLAKE3 digest of each rank file is the one
    the writer took while writing it (a hash per O_DIRECT staging buffer): it equals BLAKE3 over
    the file's bytes and the file is never read back for it; a file changed afterwards is hashed
    from disk again (the writer's digest is tied to its size and mtime)."""
    import builders.manifest as M
    from builders.cli import main

    hf_dir, _ = tiny_model()
    made = []  # the run's own Digests (real), as handed to build.json, kept to look into afterwards
    real_write = M.write_manifest
    monkeypatch.setattr(M, "write_manifest", lambda *a, **k: made.append(k["digests"])
                        or real_write(*a, **k))
    read_back = []
    real = M.file_digest
    monkeypatch.setattr(M, "file_digest", lambda p, *a, **k: read_back.append(Path(p).name)
                        or real(p, *a, **k))
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--tp", "2", "--output", str(out), "--no-progress",
                 "--checkpoint-only"]) == 0
    files = {e["path"]: e for e in json.loads((out / MANIFEST_NAME).read_text())["outputs"]["files"]}
    ranks = [out / "checkpoint" / f"rank{r}.safetensors" for r in range(2)]
    for p in ranks:
        assert files[f"checkpoint/{p.name}"]["blake3"] == _b3(p)
        assert files[f"checkpoint/{p.name}"]["size"] == p.stat().st_size
    digests = made[0]
    if digests.known(ranks[0]) is None:
        pytest.skip(f"{tmp_path} does not take O_DIRECT: rank files go through the page cache")
    assert not [n for n in read_back if n.startswith("rank")], read_back
    assert "config.json" in read_back  # small files the writer did not write: read as before

    with open(ranks[0], "r+b") as f:  # same size, new bytes: the recorded digest no longer holds
        f.write(b"\0" * 8)
    assert digests.known(ranks[0]) is None
    write_manifest(out, inputs={}, options={}, stage_timings={}, digests=digests)
    files = {e["path"]: e for e in json.loads((out / MANIFEST_NAME).read_text())["outputs"]["files"]}
    assert files["checkpoint/rank0.safetensors"]["blake3"] == _b3(ranks[0])
