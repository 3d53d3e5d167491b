"""The calibration store's O_DIRECT safetensors writer (quantize/direct_save.py): what it writes
reads back through safetensors' own reader with every name, dtype, shape, value and the metadata;
tails of any length; views and shared storage; and ``save_file``'s path where O_DIRECT is refused."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantize import direct_save


def _tensors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 77, generator=g)
    return {
        "w.fp8": (w / 4).to(torch.float8_e4m3fn),
        "w.int8": (w * 20).round().clamp(-128, 127).to(torch.int8),
        "w.t": w.t(),                      # a non-contiguous view
        "w.rows": w[5:9],                  # a view into the same storage as w.t
        "scale": torch.tensor(0.25, dtype=torch.float32),  # 0-dim
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "alpha": torch.tensor(0.75, dtype=torch.float64),
        "bf": torch.randn(13, generator=g).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
    }


def _check(path, tensors, metadata):
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        b = back[k]
        assert (b.dtype, b.shape) == (t.dtype, t.shape), k
        assert torch.equal(b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
                           t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                           else t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata


@pytest.mark.parametrize("buffer", [4096, 8192 * 3, 2**20])
def test_written_file_reads_back_through_safetensors(tmp_path, monkeypatch, buffer):
    monkeypatch.setattr(direct_save, "_BUFFER", buffer)  # files spanning many buffers, odd tails
    tensors, meta = _tensors(), {"passes": "0,0,1", "batches": "2"}
    path = tmp_path / "layer.safetensors"
    direct_save.save(tensors, str(path), metadata=meta)
    n = os.path.getsize(path)
    assert n % 4096, "the test wants a tail that is not a multiple of the alignment"
    _check(path, tensors, meta)


def test_file_systems_refusing_o_direct_get_save_file(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_save.os, "open", no_direct)
    tensors = _tensors()
    path = tmp_path / "layer.safetensors"
    direct_save.save(tensors, str(path))
    _check(path, tensors, None)


def test_o_direct_refused_at_the_first_write_goes_on_buffered(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT at open but refuses its writes (EINVAL while the flag is
    set): the sink clears the flag and the same bytes land through the page cache."""
    import fcntl

    from common import fileio

    real, refused = fileio.pwrite_all, []

    def picky(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(fileio, "pwrite_all", picky)
    monkeypatch.setattr(direct_save, "_BUFFER", 8192)
    tensors, meta = _tensors(), {"passes": "1"}
    path = tmp_path / "layer.safetensors"
    direct_save.save(tensors, str(path), metadata=meta)
    if not refused:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    _check(path, tensors, meta)
