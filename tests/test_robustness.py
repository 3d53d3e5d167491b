"""Determinism, resume after interruption, SIGTERM, full disk and read-only output."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

import convert.convert as cc
from common.interrupt import Interrupted
from convert_helper import convert_checkpoint, interrupt_before_rank
from common.errors import UserError


def hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_byte_identical_across_runs_and_worker_counts(tmp_path, tiny_model):
    hf_dir, _ = tiny_model(num_key_value_heads=2, vocab_size=1001)
    a = convert_checkpoint(hf_dir, tmp_path / "a", tp=4, progress=False, workers=1)
    convert_checkpoint(hf_dir, tmp_path / "b", tp=4, progress=False, workers=1)
    convert_checkpoint(hf_dir, tmp_path / "c", tp=4, progress=False, workers=4)
    assert a["mapping"]["world_size"] == 4
    ha = hashes(tmp_path / "a")
    assert len(ha) == 5
    assert ha == hashes(tmp_path / "b") == hashes(tmp_path / "c")


def test_resume_redoes_only_unfinished_ranks(tmp_path, tiny_model, monkeypatch):
    hf_dir, _ = tiny_model()
    clean = tmp_path / "clean"
    convert_checkpoint(hf_dir, clean, tp=4, progress=False)
    real = cc._write_rank
    written = []

    def interrupted_at_rank2(model_dir, plan, path, rank, progress, **kw):
        if rank == 2:
            raise KeyboardInterrupt
        written.append(rank)
        return real(model_dir, plan, path, rank, progress, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(cc, "_write_rank", interrupted_at_rank2)
    with pytest.raises(Interrupted, match="rerun the same command"):
        convert_checkpoint(hf_dir, out, tp=4, progress=False)
    assert written == [0, 1]
    assert not out.exists()
    partial = tmp_path / "out.partial"
    assert sorted(p.name for p in partial.glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]

    written.clear()

    def spy(model_dir, plan, path, rank, progress, **kw):
        written.append(rank)
        return real(model_dir, plan, path, rank, progress, **kw)

    monkeypatch.setattr(cc, "_write_rank", spy)
    convert_checkpoint(hf_dir, out, tp=4, progress=False)
    assert written == [2, 3]
    assert hashes(out) == hashes(clean)
    assert not partial.exists()


def test_resume_discards_partial_from_other_options(tmp_path, tiny_model, monkeypatch):
    hf_dir, _ = tiny_model()
    real = interrupt_before_rank(monkeypatch)
    with pytest.raises(Interrupted):
        convert_checkpoint(hf_dir, tmp_path / "out", tp=2, dtype="float16", progress=False)
    monkeypatch.setattr(cc, "_write_rank", real)
    convert_checkpoint(hf_dir, tmp_path / "out", tp=2, dtype="bfloat16", progress=False)
    convert_checkpoint(hf_dir, tmp_path / "ref", tp=2, dtype="bfloat16", progress=False)
    assert hashes(tmp_path / "out") == hashes(tmp_path / "ref")


def test_sigterm_mid_write_leaves_no_checkpoint(tmp_path, tiny_model):
    # Big enough that four ranks take a few seconds, so the signal lands mid-write.
    hf_dir, _ = tiny_model(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                           vocab_size=32000, num_attention_heads=8, num_key_value_heads=4)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "builders", "--model", str(hf_dir), "--output",
                             str(out), "--tp", "4", "--checkpoint-only", "--no-progress"],
                            stderr=subprocess.PIPE, text=True)
    partial = out / "checkpoint.partial"
    deadline = time.time() + 120
    while not list(partial.glob("*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not (out / "checkpoint").exists()
    assert not list(partial.glob("*.tmp"))  # only complete rank files are kept for resume
    rc = subprocess.run([sys.executable, "-m", "builders", "--model", str(hf_dir), "--output",
                         str(out), "--tp", "4", "--checkpoint-only", "--no-progress"],
                        capture_output=True, text=True, timeout=300).returncode
    assert rc == 0 and len(list((out / "checkpoint").glob("rank*.safetensors"))) == 4


def _mount_tmpfs(path, options):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def test_full_disk(tmp_path, tiny_model):
    hf_dir, _ = tiny_model()  # ~1 MB of fp16 weights; the disk holds 256 KB
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=256k")
    try:
        with pytest.raises(UserError, match="No space left on device.*free space"):
            convert_checkpoint(hf_dir, disk / "out" / "checkpoint", progress=False)
        assert not (disk / "out" / "checkpoint").exists()
        assert not (disk / "out" / "checkpoint.partial").exists()
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_output(tmp_path, tiny_model):
    hf_dir, _ = tiny_model()
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "ro,size=1m")
    try:
        with pytest.raises(UserError, match="cannot write to .*Read-only file system"):
            convert_checkpoint(hf_dir, disk / "out" / "checkpoint", progress=False)
    finally:
        subprocess.run(["umount", str(disk)])
