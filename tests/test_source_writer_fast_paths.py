"""The I/O fast paths (pread reads, kernel file-to-file copies, reused conversion buffers) give
exactly what safetensors and modelopt give, for fp16/bf16/fp32 sources, tp 1/2/4, GQA with
kv < tp, vocabulary padding, and with the kernel copy unavailable."""
from __future__ import annotations

import blake3
import pytest
import torch
from safetensors import safe_open

from common import fileio
from common.digests import Digests
from convert import writer
from convert_helper import convert_checkpoint
from convert.source import SourceCheckpoint
from quantize.torch_io import read_tensor, tensor_chunk


def modelopt_export(model, out_dir, tp: int):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    model.config.rope_theta = model.config.rope_parameters["rope_theta"]  # transformers >= 5
    export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.float16,
                                   export_dir=out_dir, inference_tensor_parallel=tp)
    return out_dir


def assert_same_checkpoint(ours, theirs, world):
    from safetensors.torch import load_file

    for r in range(world):
        a = load_file(ours / f"rank{r}.safetensors")
        b = load_file(theirs / f"rank{r}.safetensors")
        assert sorted(a) == sorted(b), f"rank {r}: names differ: {set(a) ^ set(b)}"
        for name in b:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (r, name)


@pytest.mark.parametrize("src_dtype,tp,kv,vocab", [
    (torch.float16, 1, 4, 1000),
    (torch.float16, 2, 4, 1000),
    (torch.float16, 4, 2, 1001),    # kv < tp, padded vocab: zero pieces and duplicated kv rows
    (torch.bfloat16, 2, 4, 1000),   # converted through the reused buffers
])
def test_fast_paths_match_modelopt(tmp_path, tiny_model, src_dtype, tp, kv, vocab):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    model = make_tiny_model(hf_dir, num_key_value_heads=kv, vocab_size=vocab,
                            num_hidden_layers=2, dtype=src_dtype, max_shard_size="300KB")
    ours = tmp_path / "ours"
    convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False)
    theirs = modelopt_export(model.to(src_dtype), tmp_path / "modelopt", tp)
    assert_same_checkpoint(ours, theirs, tp)


def test_without_kernel_copy(tmp_path, tiny_model, monkeypatch):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, num_hidden_layers=2, dtype=torch.float16)
    convert_checkpoint(hf_dir, tmp_path / "a", tp=2, dtype="float16", progress=False)
    monkeypatch.setattr(writer, "_kernel_copy", [False])
    convert_checkpoint(hf_dir, tmp_path / "b", tp=2, dtype="float16", progress=False)
    for r in range(2):
        assert (tmp_path / "a" / f"rank{r}.safetensors").read_bytes() == \
            (tmp_path / "b" / f"rank{r}.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_read_equals_safetensors_slices(tmp_path, dtype):
    from examples.tiny import make_tiny_model

    make_tiny_model(tmp_path, num_hidden_layers=1, dtype=dtype)
    src = SourceCheckpoint(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    rows, cols = src.shape(name)
    indices = [(), (slice(3, 17),), (slice(None), slice(8, 40)), (slice(5, 9), slice(0, cols)),
               (slice(0, 0),), (slice(2, 2), slice(1, 3)), (slice(-4, None),),
               (slice(1, 9, 3), slice(2, 5)), (4,)]  # numpy's indexing of all rows
    with safe_open(str(src.meta[name][0]), framework="pt") as f:
        for index in indices:
            got = read_tensor(src, name, index)
            want = f.get_slice(name)[index] if index else f.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want), index
            assert got.is_contiguous()
    norm = "model.layers.0.input_layernorm.weight"
    with safe_open(str(src.meta[norm][0]), framework="pt") as f:
        assert torch.equal(read_tensor(src, norm), f.get_tensor(norm))
        assert torch.equal(read_tensor(src, norm, (slice(4, 9),)), f.get_tensor(norm)[4:9])


def test_corrupt_offsets_are_a_user_error(tmp_path):
    import json
    import struct

    from common.errors import UserError

    t = {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 16]}  # needs 32 bytes
    raw = json.dumps({"w": t}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    with pytest.raises(UserError, match="corrupt"):
        SourceCheckpoint(tmp_path)


@pytest.mark.parametrize("tp,writers,ramp", [(1, 1, ()), (2, 2, (4096, 8192)), (4, 3, (4096,))])
def test_direct_io_gives_the_same_bytes(tmp_path, monkeypatch, tp, writers, ramp):
    """O_DIRECT staging (aligned buffers, padded tail truncated) == buffered writes, byte for byte;
    the 16 KB staging buffer makes every file span many buffers and end mid-buffer, written by
    1-3 writer threads at their offsets, each file's first writes smaller (the ramp) or not."""
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, num_hidden_layers=2, dtype=torch.float16, vocab_size=1001,
                    num_key_value_heads=2)
    monkeypatch.setenv("BUILD_ENGINE_DIRECT_IO", "0")
    convert_checkpoint(hf_dir, tmp_path / "buffered", tp=tp, dtype="float16", progress=False)
    monkeypatch.setenv("BUILD_ENGINE_DIRECT_IO", "1")
    monkeypatch.setattr(fileio, "DIRECT_BUFFER", 16 * 1024)
    monkeypatch.setattr(fileio, "DIRECT_WRITERS", writers)
    monkeypatch.setattr(fileio, "DIRECT_RAMP", ramp)
    sinks, writes = [], {}
    real_open, real_write = writer._open_sink, fileio.DirectSink._write

    def spy(path):
        fd, sink = real_open(path)
        sinks.append(type(sink).__name__)
        return fd, sink

    def spy_write(self, data, offset):
        writes.setdefault(self, []).append((offset, len(data)))  # the sink kept: ids differ
        real_write(self, data, offset)

    monkeypatch.setattr(writer, "_open_sink", spy)
    monkeypatch.setattr(fileio.DirectSink, "_write", spy_write)
    digests = Digests()
    convert_checkpoint(hf_dir, tmp_path / "direct", tp=tp, dtype="float16", progress=False,
                       digests=digests)
    if sinks != ["DirectSink"] * tp:
        pytest.skip(f"{tmp_path} does not take O_DIRECT ({sinks})")
    assert len(writes) == tp
    for w in writes.values():  # per file, in offset order: the ramp, then whole buffers
        sizes = [n for _, n in sorted(w)]
        assert sizes[:len(ramp) + 1] == [*ramp, 16 * 1024] and set(sizes[len(ramp):-1]) == {16384}
    for r in range(tp):
        a = (tmp_path / "buffered" / f"rank{r}.safetensors").read_bytes()
        b = (tmp_path / "direct" / f"rank{r}.safetensors").read_bytes()
        assert len(a) % 4096 and a == b
        # the writer's own BLAKE3 digest (hash thread, padded tail left out), for build.json
        assert digests.known(tmp_path / "direct" / f"rank{r}.safetensors") == \
            blake3.blake3(b).hexdigest()


def test_buffered_writer_digest_is_blake3_unless_the_kernel_copied(tmp_path, monkeypatch):
    """Page-cache writes (BUILD_ENGINE_DIRECT_IO=0): when every byte passed through user space
    (header, a torch tensor's ByteChunk, a ByteChunk) the writer records the file's BLAKE3 digest for
    build.json; a FileSpan copied by the kernel leaves none (build.json then reads the file)."""
    import os
    from types import SimpleNamespace

    import numpy as np

    from common.dtypes import as_dtype

    monkeypatch.setenv("BUILD_ENGINE_DIRECT_IO", "0")
    f16 = as_dtype("float16")
    a = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    b = np.linspace(0, 1, 5, dtype=np.float16)
    tensors = [SimpleNamespace(name="a", shape=(2, 3), dtype=f16),
               SimpleNamespace(name="b", shape=(5,), dtype=f16)]
    chunks = {"a": [tensor_chunk(a)], "b": [writer.ByteChunk(b.view(np.uint8).data, f16)]}
    path = tmp_path / "user.safetensors"
    digests = Digests()
    writer.write_file(path, tensors, lambda t: chunks[t.name], digests=digests)
    assert digests.known(path) == blake3.blake3(path.read_bytes()).hexdigest()
    with safe_open(path, "np") as f:
        assert (f.get_tensor("a") == a.numpy()).all() and (f.get_tensor("b") == b).all()

    src = tmp_path / "src.bin"
    src.write_bytes(b.tobytes())
    fd = os.open(src, os.O_RDONLY)
    try:
        spans = {"a": [tensor_chunk(a)], "b": [writer.FileSpan(fd, 0, b.nbytes, f16)]}
        path = tmp_path / "kernel.safetensors"
        writer.write_file(path, tensors, lambda t: spans[t.name], digests=digests)
    finally:
        os.close(fd)
    assert digests.known(path) is None
    with safe_open(path, "np") as f:
        assert (f.get_tensor("b") == b).all()


def test_direct_io_write_error_surfaces(tmp_path, monkeypatch):
    """An error in the writer thread (here: a full disk) reaches the caller as that OSError."""
    import errno

    from examples.tiny import make_tiny_model
    from common.errors import UserError

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, num_hidden_layers=2, dtype=torch.float16)
    monkeypatch.setenv("BUILD_ENGINE_DIRECT_IO", "1")
    calls = []

    def full(fd, data, offset):
        calls.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "pwrite_all", full)
    with pytest.raises(UserError, match="No space left on device"):
        convert_checkpoint(hf_dir, tmp_path / "out", tp=2, dtype="float16", progress=False)
    assert calls and not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()


def test_fsync_of_a_rank_overlaps_the_next_rank_and_precedes_its_rename(tmp_path, monkeypatch):
    """Rank 0's fsync runs while rank 1 is written (here it waits until rank 1's file is opened:
    without the overlap it would time out), and rank 0's rename to its final name follows its
    fsync; both ranks end complete and identical to a run with the fsync inline."""
    import os
    import threading
    from pathlib import Path

    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, num_hidden_layers=2, dtype=torch.float16)
    convert_checkpoint(hf_dir, tmp_path / "ref", tp=2, progress=False)
    events, overlapped, rank1_opened = [], [], threading.Event()
    real_open, real_fsync, real_replace = writer._open_sink, os.fsync, os.replace

    def spy_open(path):
        if Path(path).name == "rank1.safetensors.tmp":
            rank1_opened.set()
        return real_open(path)

    def slow_fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name == "rank0.safetensors.tmp":
            overlapped.append(rank1_opened.wait(30))
        real_fsync(fd)
        events.append(("fsync", name))

    def spy_replace(src, dst):
        events.append(("rename", Path(src).name))
        return real_replace(src, dst)

    monkeypatch.setattr(writer, "_open_sink", spy_open)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    convert_checkpoint(hf_dir, tmp_path / "out", tp=2, progress=False)
    assert overlapped == [True]
    for r in range(2):
        tmp = f"rank{r}.safetensors.tmp"
        assert events.index(("fsync", tmp)) < events.index(("rename", tmp))
        assert (tmp_path / "out" / f"rank{r}.safetensors").read_bytes() == \
            (tmp_path / "ref" / f"rank{r}.safetensors").read_bytes()


def test_failed_background_fsync_fails_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    """An fsync error on the fsync thread (here: EIO on rank 0) reaches the caller as a one-line
    UserError; the rank is never renamed complete and nothing is left behind."""
    import errno
    import os

    from common.errors import UserError
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, num_hidden_layers=2, dtype=torch.float16)
    real_fsync = os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("rank0.safetensors.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(UserError, match="Input/output error"):
        convert_checkpoint(hf_dir, tmp_path / "out", tp=2, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_staging_buffers_are_reused_across_files_then_freed(tmp_path):
    """Inside ``reusing_buffers()`` the next file's sink gets the same staging buffers (no fresh
    memory to fault in per rank); after the block, and outside any, buffers are closed."""
    import os

    def write(name):
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sink = fileio.DirectSink(fd, buf_bytes=8192, nbufs=3, hashed=False)
        bufs = list(sink._bufs)
        sink.write(memoryview(bytes(range(256)) * 100))
        sink.close()
        os.close(fd)
        assert (tmp_path / name).read_bytes() == bytes(range(256)) * 100
        return bufs

    with fileio.reusing_buffers():
        first = write("a")
        second = write("b")
        assert {id(b) for b in second} == {id(b) for b in first}
        assert not any(b.closed for b in second)
    assert all(b.closed for b in second) and not fileio._POOL
    assert all(b.closed for b in write("c"))
