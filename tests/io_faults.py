"""TEST DOUBLE of a failing disk: ``DiskFault`` makes every write to a file whose path matches a
pattern fail with an errno (ENOSPC, EIO, ...) the way the kernel reports it (an OSError without a
file name), for the fault-injection tests (test_io_faults.py).

It patches, for the test's duration, the calls this project's writers reach the disk through:
``os.open`` + ``os.write`` / ``os.pwrite`` / ``os.pwritev`` (the rank and store files, plain and
O_DIRECT), ``open`` / ``io.open`` in a writing mode (``Path.write_text``; the file is created,
its first write fails), and ``os.sendfile`` / ``os.copy_file_range`` into such a file (shutil's
copies, the converter's copy fast path). Nothing is written to a matching file; files that do not
match are written for real.
"""
from __future__ import annotations

import builtins
import fnmatch
import io
import os

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


class _FailingFile:
    """A file opened for writing whose every write fails (its handle is real: fileno, close)."""

    def __init__(self, f, fault: "DiskFault"):
        self._f, self._fault = f, fault

    def write(self, data):
        self._fault.fail(self._f.name)

    def close(self):
        self._fault.forget(self._f.fileno())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class DiskFault:
    """TEST DOUBLE: writes to files whose path matches ``pattern`` (fnmatch on the whole path)
    fail with ``err``; ``hits`` lists the paths that failed."""

    def __init__(self, monkeypatch, pattern: str, err: int):
        self.pattern, self.err = pattern, err
        self.fds: dict[int, str] = {}
        self.hits: list[str] = []
        real = {n: getattr(os, n) for n in ("open", "close", "write", "pwrite", "pwritev",
                                             "sendfile", "copy_file_range")}
        real_open = io.open

        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            fd = real["open"](path, flags, mode, dir_fd=dir_fd)
            if flags & _WRITE_FLAGS and self.matches(path):
                self.fds[fd] = os.fspath(path)
            return fd

        def os_close(fd):
            self.forget(fd)
            return real["close"](fd)

        def on_fd(name, pos=0):
            def call(*args, **kw):
                if args[pos] in self.fds:
                    self.fail(self.fds[args[pos]])
                return real[name](*args, **kw)
            return call

        def py_open(file, mode="r", *args, **kw):
            f = real_open(file, mode, *args, **kw)
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                    self.matches(file):
                self.fds[f.fileno()] = os.fspath(file)
                return _FailingFile(f, self)
            return f

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "close", os_close)
        for name, pos in (("write", 0), ("pwrite", 0), ("pwritev", 0), ("sendfile", 0),
                          ("copy_file_range", 1)):
            monkeypatch.setattr(os, name, on_fd(name, pos))
        monkeypatch.setattr(io, "open", py_open)
        monkeypatch.setattr(builtins, "open", py_open)

    def matches(self, path) -> bool:
        return fnmatch.fnmatch(os.path.abspath(os.fspath(path)), self.pattern)

    def forget(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def fail(self, path: str):
        self.hits.append(path)
        raise OSError(self.err, os.strerror(self.err))
