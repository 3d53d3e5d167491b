"""common.staged.StagedOutput: the stage / fingerprint / resume-or-refuse / promote / discard
pattern every writer uses, on real directories."""
from __future__ import annotations

import json

import pytest

from common.errors import UserError
from common import ownership
from common.ownership import RECORD, mark_finished
from common.staged import StagedOutput


def _files(d):
    """The files under ``d`` but the tool's ownership record (common.ownership)."""
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                  if p.is_file() and p.name != RECORD)


def test_resume_with_the_same_fingerprint_keeps_finished_parts(tmp_path):
    out = StagedOutput(tmp_path / "ckpt")
    assert out.open({"a": 1}) is False
    (out.stage / "rank0.safetensors").write_bytes(b"done")
    again = StagedOutput(tmp_path / "ckpt")
    assert again.open({"a": 1}) is True
    assert (again.stage / "rank0.safetensors").read_bytes() == b"done"
    assert again.recorded() == {"a": 1}


def test_another_fingerprint_is_discarded_or_refused(tmp_path):
    out = StagedOutput(tmp_path / "ckpt")
    out.open({"a": 1})
    (out.stage / "rank0.safetensors").write_bytes(b"theirs")
    with pytest.raises(UserError, match="^other inputs$"):
        StagedOutput(tmp_path / "ckpt").open({"a": 2}, refuse="other inputs")
    assert (out.stage / "rank0.safetensors").read_bytes() == b"theirs"  # refused: untouched
    assert StagedOutput(tmp_path / "ckpt").open({"a": 2}) is False       # no refusal: discarded
    assert _files(out.stage) == [".fingerprint.json"] and out.recorded() == {"a": 2}


def test_without_resume_a_stage_of_the_same_fingerprint_starts_afresh(tmp_path):
    out = StagedOutput(tmp_path / "engines")
    out.open({"a": 1})
    (out.stage / "rank0.engine").write_bytes(b"old")
    assert out.open({"a": 1}, resume=False, refuse="never raised") is False
    assert _files(out.stage) == [".fingerprint.json"]


def test_promote_replaces_the_destination_whole_without_the_record(tmp_path):
    dest = tmp_path / "engines"
    dest.mkdir()
    (dest / "stale.engine").write_bytes(b"old")
    mark_finished(dest)  # an earlier run's output: the tool's own
    out = StagedOutput(dest, record="fingerprint.json")
    out.open({"a": 1})
    (out.stage / "rank0.engine").write_bytes(b"new")
    out.promote()
    assert _files(dest) == ["rank0.engine"] and not out.stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD, "engines"]  # no .old left


def test_failure_discards_only_its_own_files_when_asked(tmp_path):
    out = StagedOutput(tmp_path / "ckpt")
    out.open({"a": 1})
    (out.stage / "rank0.safetensors").write_bytes(b"other run")
    (out.stage / "rank1.safetensors.tmp").write_bytes(b"mine")
    (out.stage / ".run-1").mkdir()
    (out.stage / ".run-1" / "x").write_bytes(b"mine")
    out.discard(["rank1.safetensors.tmp", ".run-1"])
    assert _files(out.stage) == [".fingerprint.json", "rank0.safetensors"]
    out.discard()
    assert not out.stage.exists()


def test_a_store_used_in_place_keeps_its_fingerprint_inside_its_manifest(tmp_path):
    store = tmp_path / "calibration"
    dump = lambda d: json.dumps(d, indent=2) + "\n"  # noqa: E731
    out = StagedOutput(store, stage=store, record="calibration.json",
                       keys=("version", "fingerprint"), dump=dump)
    key = {"version": 1, "fingerprint": {"x": 1}}
    assert out.open(key, record={**key, "layers_done": 0}) is False
    out.write_record({**key, "layers_done": 3})
    assert out.open(key) is True and out.read_record()["layers_done"] == 3
    assert out.open({"version": 2, "fingerprint": {"x": 1}}, record={"version": 2}) is False
    assert (store / "calibration.json").read_text() == dump({"version": 2})
    out.promote()  # in place: nothing moves
    assert store.is_dir()


def test_a_private_stage_is_fresh_and_unshared(tmp_path):
    a, b = StagedOutput.private(tmp_path / "repo"), StagedOutput.private(tmp_path / "repo")
    assert a.stage != b.stage and a.stage.is_dir() and a.stage.name.endswith(".partial")
    (a.stage / "config.pbtxt").write_text("x")
    a.promote()
    b.discard()
    assert _files(tmp_path) == ["repo/config.pbtxt"]


def test_only_the_tools_own_directories_are_discarded_or_replaced(tmp_path):
    """common.ownership through StagedOutput: a stage or destination the record does not prove
    to be the tool's is refused (one line) and left as it was."""
    stage = tmp_path / "ckpt.partial"
    stage.mkdir()
    (stage / "mine.txt").write_text("a user's")
    with pytest.raises(UserError, match=r"ckpt.partial was not written by build_engine .*"
                                        r"will not delete it"):
        StagedOutput(tmp_path / "ckpt").open({"a": 1})
    StagedOutput(tmp_path / "ckpt").discard()
    assert (stage / "mine.txt").read_text() == "a user's"
    stage.rename(tmp_path / "ckpt")  # now in the destination's place
    out = StagedOutput(tmp_path / "ckpt")
    out.open({"a": 1})
    with pytest.raises(UserError, match="ckpt was not written by build_engine"):
        out.promote()
    assert _files(tmp_path / "ckpt") == ["mine.txt"]
    mark_finished(tmp_path / "ckpt")  # as if the tool had written it ...
    (tmp_path / "ckpt" / "added.txt").write_text("x")  # ... and a user added a file
    with pytest.raises(UserError, match="ckpt/added.txt was not written by build_engine"):
        out.promote()
    (tmp_path / "ckpt" / "added.txt").unlink()
    (tmp_path / "ckpt" / "mine.txt").write_text("longer now")
    with pytest.raises(UserError, match="ckpt/mine.txt changed since build_engine wrote it"):
        out.promote()
    (tmp_path / "ckpt" / "mine.txt").write_text("a user's")  # as recorded: the tool's own
    (out.stage / "rank0.safetensors").write_bytes(b"new")
    out.promote()
    assert _files(tmp_path / "ckpt") == ["rank0.safetensors"]
    assert ownership.is_finished(tmp_path / "ckpt")


def test_sweep_removes_only_the_tools_leftovers(tmp_path):
    left = StagedOutput.private(tmp_path / "triton")  # a killed run's private stage
    theirs = tmp_path / ".triton.user.partial"
    theirs.mkdir()
    assert StagedOutput.sweep(tmp_path) == [left.stage]
    assert theirs.is_dir() and not left.stage.exists()
