"""Issue 29: the disk failing (ENOSPC, EIO) at each place build_engine writes ends in one line
naming the file, exit 2, no traceback; afterwards every output in the output directory is either
complete or absent (no staging directory, no temporary file, no build.json), and rerunning the
command (with --force where a complete checkpoint was already put in place) writes the same
bytes as a run the disk never failed.

The failing disk is the TEST DOUBLE ``io_faults.DiskFault``; the runs are the CLI's ``main()`` in
this process, with the TensorRT-LLM seam replaced by ``engine_fakes.RecordingFakeTrtllm`` (a
TEST DOUBLE: "not installed" for the Triton runs, placeholder engines for the engine records)."""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

import builders.engine as E
from builders.cli import main
from engine_fakes import RecordingFakeTrtllm
from io_faults import DiskFault

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from matrix import digest_tree  # noqa: E402

CAL = ["--calib-size", "2", "--calib-seq-len", "16"]

#: name -> (flags, whether TensorRT-LLM "builds" engines, exit status of a good run)
COMMANDS = {
    "float-triton": (["--tp", "2"], False, 3),
    "float-engines": (["--tp", "2", "--triton-target", "none"], True, 0),
    "fp8": (["--tp", "2", "--fp8", "--checkpoint-only", *CAL], False, 0),
    "pytorch": (["--target", "pytorch", "--checkpoint-only"], False, 0),
}

#: site -> (command, the files whose writes fail (under the output dir), what the line names)
SITES = {
    "checkpoint-rank": ("float-triton", "checkpoint.partial/rank1.safetensors*",
                        "checkpoint.partial/rank1.safetensors"),
    "checkpoint-config": ("float-triton", "checkpoint.partial/.config.json.*",
                          "checkpoint.partial/config.json"),
    "triton-config": ("float-triton", ".triton.*.partial/tensorrt_llm/*config.pbtxt*",
                      "/tensorrt_llm/config.pbtxt"),
    "triton-launch-script": ("float-triton", ".triton.*.partial/.launch_triton.sh.*",
                             "/launch_triton.sh"),
    "triton-template-copy": ("float-triton", ".triton.*.partial/preprocessing/1/model.py",
                             "/preprocessing/1/model.py"),
    "build-json": ("float-triton", ".build.json.*", "build.json"),
    "engine-record": ("float-engines", "engines.partial/.ranks/.rank1.json.*",
                      "engines.partial/.ranks/rank1.json"),
    "calibration-layer": ("fp8", "calibration/layer_00001.safetensors*",
                          "calibration/layer_00001.safetensors"),
    "calibration-manifest": ("fp8", "calibration/.calibration.json.*",
                             "calibration/calibration.json"),
    "unified-tensors": ("pytorch", "hf_quantized.partial/model.safetensors*",
                        "hf_quantized.partial/model.safetensors"),
    "unified-config": ("pytorch", "hf_quantized.partial/.config.json.*",
                       "hf_quantized.partial/config.json"),
}
ERRORS = {errno.ENOSPC: "No space left on device; free space or choose another --output",
          errno.EIO: "Input/output error; the disk reported an I/O error"}


@pytest.fixture(scope="module")
def model_dir(golden_llama):
    return golden_llama  # tests/conftest.py


def _run(model_dir, root: Path, command: str, monkeypatch, *extra) -> int:
    flags, engines, _ = COMMANDS[command]
    backend = RecordingFakeTrtllm() if engines else \
        RecordingFakeTrtllm(version=None, import_error="No module named 'tensorrt_llm'")
    monkeypatch.setattr(E, "TrtllmBackend", lambda: backend)
    return main(["--model", str(model_dir), "--output", str(root / "out"), "--no-progress",
                 *flags, *extra])


_REFERENCE: dict = {}


def _reference(model_dir, tmp_path_factory, command: str, force: bool) -> dict:
    """The files of an undisturbed run of ``command`` (cached per module)."""
    key = (command, force)
    if key not in _REFERENCE:
        root = tmp_path_factory.mktemp(f"ref-{command}")
        with pytest.MonkeyPatch.context() as mp:
            rc = _run(model_dir, root, command, mp, *["--force"] * force)
        assert rc == COMMANDS[command][2]
        _REFERENCE[key] = digest_tree(root / "out", root)
    return _REFERENCE[key]


def _check_nothing_half_written(out: Path) -> None:
    """Each output there is complete; no staging dir, temporary file or build.json is left."""
    from safetensors import safe_open

    from builders.triton import validate_repo

    if not out.exists():
        return
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    # the ownership record and the output lock (common.ownership, common.outlock) are the tool's
    # own bookkeeping beside the outputs, not a half-written output
    hidden = [p for p in left if "/." in f"/{p}" and not p.startswith("engines/.ranks")
              and p not in (".build_engine.json", ".build_engine.lock")]
    assert not hidden and not [p for p in left if p.endswith(".tmp") or ".partial" in p], left
    assert "build.json" not in left, left
    ckpt = out / "checkpoint"
    if ckpt.exists():
        world = json.loads((ckpt / "config.json").read_text())["mapping"]["world_size"]
        for r in range(world):
            with safe_open(str(ckpt / f"rank{r}.safetensors"), framework="numpy") as f:
                assert list(f.keys())
    if (out / "triton").exists():
        validate_repo(out / "triton")
    assert not (out / "engines").exists() or (out / "engines" / "config.json").is_file()
    manifest = out / "calibration" / "calibration.json"
    if manifest.exists():  # complete, or a resumable record of the finished layers
        man = json.loads(manifest.read_text())
        done = len(list((out / "calibration").glob("layer_*.safetensors")))
        assert done == (man["num_layers"] if man["complete"] else man["layers_done"]), left


@pytest.mark.parametrize("err", sorted(ERRORS), ids=lambda e: errno.errorcode[e])
@pytest.mark.parametrize("site", sorted(SITES))
def test_disk_fault_at_each_write_site(site, err, model_dir, tmp_path, tmp_path_factory,
                                       monkeypatch, capsys):
    command, pattern, named = SITES[site]
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        fault = DiskFault(mp, f"{out}/{pattern}", err)
        rc = _run(model_dir, tmp_path, command, mp)
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert fault.hits, f"nothing was written to {pattern}"
    assert rc == 2, err_lines
    line = err_lines[-1]
    assert [ln for ln in err_lines if ln.startswith("build_engine: error:")] == [line], err_lines
    assert line.startswith(f"build_engine: error: {out}/") and named in line, line
    assert ERRORS[err] in line, line
    _check_nothing_half_written(out)

    force = (out / "checkpoint").exists() or (out / "hf_quantized").exists()
    assert _run(model_dir, tmp_path, command, monkeypatch, *["--force"] * force) == \
        COMMANDS[command][2]
    assert digest_tree(out, tmp_path) == _reference(model_dir, tmp_path_factory, command, force)
