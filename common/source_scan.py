"""One read of the model's weight files: each file's BLAKE3 digest and, per floating-point tensor,
how many of its values are NaN or Inf.

The model's identity is its bytes, not its file names, sizes or headers: a fine-tune of the same
base has the same config, shapes and headers. :class:`SourceScan` reads every weight file once,
in a background thread started when the model is opened, so a float conversion (which reads the
same bytes at the disk's pace, mostly file to file in the kernel) does not wait for it; the
calibration store and a resumed stage ask for the digest before they start and wait for it then.
Results are kept per file state (device, inode, size, mtime, ctime), so build.json's input digests
(builders.manifest) reuse them instead of reading the files again.

The non-finite count costs one masked max per chunk (~9 GB/s on one core; an exponent of all ones
is Inf or NaN in every IEEE format), counted exactly only when that finds one.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

CHUNK = 8 * 2**20
# safetensors dtype -> (unsigned view, exponent mask): all ones there is Inf or NaN
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
             "F32": (np.uint32, 0x7F800000), "F64": (np.uint64, 0x7FF0000000000000)}

_memo: dict[tuple, tuple[str, dict[str, int]]] = {}
_inflight: dict[tuple, threading.Event] = {}  # files being scanned: a second asker waits
_memo_lock = threading.Lock()


def _key(path: Path) -> tuple:
    st = os.stat(path)  # ctime too: a rewrite that restores the mtime still changes it
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memo_get(path: Path):
    try:
        key = _key(path)
    except OSError:
        return None
    with _memo_lock:
        return _memo.get(key)


def known_digest(path) -> str | None:
    """The BLAKE3 digest a scan took of ``path`` in its current state, or None."""
    try:
        key = _key(Path(path))
    except OSError:
        return None
    with _memo_lock:
        hit = _memo.get(key)
    return hit[0] if hit else None


def _nonfinite(data: np.ndarray, st: str) -> int:
    view, mask = _EXPONENT[st]
    n = data.nbytes // np.dtype(view).itemsize
    if not n:
        return 0
    bits = np.bitwise_and(data[:n * np.dtype(view).itemsize].view(view), view(mask))
    return int(np.count_nonzero(bits == mask)) if bits.max() == mask else 0


def scan_file(path: Path, tensors: list[tuple[str, int, int, str]]) -> tuple[str, dict[str, int]]:
    """(BLAKE3 of the file, tensor -> count of NaN/Inf values for those that have any);
    ``tensors``: (name, absolute begin, end, safetensors dtype). A file another thread is
    scanning is waited for, not read twice."""
    if result := _memo_get(path):
        return result
    key = _key(path)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
        event = _inflight.get(key)
        mine = event is None
        if mine:
            event = _inflight[key] = threading.Event()
    if not mine:
        event.wait()
        with _memo_lock:
            if key in _memo:
                return _memo[key]
    try:
        result = _scan(path, tensors)
    finally:
        if mine:
            with _memo_lock:
                _inflight.pop(key, None)
            event.set()
    with _memo_lock:
        _memo[key] = result
    return result


def _scan(path: Path, tensors) -> tuple[str, dict[str, int]]:
    import blake3

    h, bad = blake3.blake3(), {}
    buf = np.empty(CHUNK, dtype=np.uint8)
    size = path.stat().st_size
    pieces = sorted((b, e, name, st) for name, b, e, st in tensors)
    with open(path, "rb", buffering=0) as f:
        pos = 0
        # the header, then each tensor in whole elements (its bytes contiguous: the reader
        # checked the offsets), then whatever follows: the file in order, hashed as it is read
        for b, e, name, st in [*pieces, (size, size, None, None)]:
            for start, end, item in ((pos, b, None), (b, e, st)):
                step = CHUNK - CHUNK % np.dtype(_EXPONENT[item][0]).itemsize \
                    if item in _EXPONENT else CHUNK
                while start < end:
                    n = f.readinto(memoryview(buf)[:min(step, end - start)])
                    if not n:
                        raise OSError(f"{path} ends at byte {start}, before {end}")
                    h.update(buf[:n])
                    if item in _EXPONENT:
                        k = _nonfinite(buf[:n], item)
                        if k:
                            bad[name] = bad.get(name, 0) + k
                    start += n
            pos = max(pos, e)
    return h.hexdigest(), bad


def identity(files) -> str:
    """One BLAKE3 over the weight files' (name, size, BLAKE3) lines, sorted by name: the model's
    identity (build.json's ``inputs.weights_blake3``, the calibration store's and the staged
    checkpoint's ``weights``)."""
    import blake3

    h = blake3.blake3()
    for name, size, digest in sorted(files):
        h.update(f"{name}\t{size}\t{digest}\n".encode())
    return h.hexdigest()


class SourceScan:
    """:func:`scan_file` of every weight file, in a background thread (``background=False``: on
    the first question). ``tensors``: file -> [(name, absolute begin, end, safetensors dtype)]."""

    def __init__(self, tensors: dict[Path, list], background: bool = True):
        self._tensors = tensors
        self._done: dict[Path, tuple[str, dict]] = {}
        self._error: BaseException | None = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="source-scan", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for path in sorted(self._tensors):
                self._done[path] = scan_file(path, self._tensors[path])
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self._error = e

    def wait(self) -> dict[Path, tuple[str, dict]]:
        if self._thread is None:
            self._run()
            self._thread = threading.current_thread()  # ran
        elif self._thread is not threading.current_thread():
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._done

    def file_digests(self) -> dict[str, str]:
        """file name -> BLAKE3 (hex)."""
        return {p.name: d for p, (d, _) in sorted(self.wait().items())}

    def weights_digest(self) -> str:
        """The model's identity (:func:`identity` of its weight files)."""
        return identity((p.name, p.stat().st_size, d) for p, (d, _) in self.wait().items())

    def nonfinite(self) -> dict[str, int]:
        """tensor -> number of NaN/Inf values, for the tensors that hold any."""
        out: dict[str, int] = {}
        for _, (_, bad) in sorted(self.wait().items()):
            out.update(bad)
        return dict(sorted(out.items()))
