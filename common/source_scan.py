"""One read of the model's weight files: each tensor's BLAKE3 digest and, per floating-point
tensor, how many of its values are NaN or Inf.

The model's identity is its tensors, not its files: one BLAKE3 over the sorted (name, dtype,
shape, BLAKE3 of the tensor's bytes) list (:func:`identity`). A fine-tune of the same base (same
config, shapes and headers) is another model; the same tensors re-sharded into another number of
files, or saved again with other header metadata or another tensor order, are the same model.
:class:`SourceScan` reads every weight file's tensors once, in a background thread started when
the model is opened, so a float conversion (which reads the same bytes at the disk's pace, mostly
file to file in the kernel) does not wait for it; the calibration store and a resumed stage ask
for the identity before they start and wait for it then. Results are kept per file state
(device, inode, size, mtime, ctime), so build.json's input record (builders.manifest: per weight
file, the identity of its tensors) reuses them instead of reading the files again. Each byte is
hashed once: a whole-file digest beside the tensors' would cost a second BLAKE3 pass (+30 % CPU
of the scan, measured), and nothing verifies the input files by it.

The non-finite count costs one masked max per chunk (~9 GB/s on one core; an exponent of all ones
is Inf or NaN in every IEEE format), counted exactly only when that finds one.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

CHUNK = 8 * 2**20
# safetensors dtype -> (unsigned view, exponent mask): all ones there is Inf or NaN
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
             "F32": (np.uint32, 0x7F800000), "F64": (np.uint64, 0x7FF0000000000000)}


class FileScan(NamedTuple):
    """What one read of a weight file found."""

    nonfinite: dict[str, int]                     # tensor -> NaN/Inf count, those with any
    tensors: dict[str, tuple[str, tuple, str]]    # tensor -> (dtype, shape, BLAKE3 of its bytes)


_memo: dict[tuple, FileScan] = {}
_inflight: dict[tuple, threading.Event] = {}  # files being scanned: a second asker waits
_memo_lock = threading.Lock()


def _key(path: Path) -> tuple:
    st = os.stat(path)  # ctime too: a rewrite that restores the mtime still changes it
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memo_hit(key: tuple, tensors) -> FileScan | None:
    """The kept scan of ``key`` when it covers ``tensors`` (an index may leave some of a file's
    tensors out of the model: a scan for the model covers fewer than one of the whole file)."""
    hit = _memo.get(key)
    if hit is not None and all(t[0] in hit.tensors for t in tensors):
        return hit
    return None


def _nonfinite(data: np.ndarray, st: str) -> int:
    view, mask = _EXPONENT[st]
    n = data.nbytes // np.dtype(view).itemsize
    if not n:
        return 0
    bits = np.bitwise_and(data[:n * np.dtype(view).itemsize].view(view), view(mask))
    return int(np.count_nonzero(bits == mask)) if bits.max() == mask else 0


def scan_file(path: Path, tensors: list[tuple]) -> FileScan:
    """The one read of ``path``; ``tensors``: (name, absolute begin, end, safetensors dtype,
    shape). A file another thread is scanning is waited for, not read twice."""
    key = _key(path)
    with _memo_lock:
        if hit := _memo_hit(key, tensors):
            return hit
        event = _inflight.get(key)
        mine = event is None
        if mine:
            event = _inflight[key] = threading.Event()
    if not mine:
        event.wait()
        with _memo_lock:
            if hit := _memo_hit(key, tensors):
                return hit
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


def _scan(path: Path, tensors) -> FileScan:
    import blake3

    bad, digests = {}, {}
    buf = np.empty(CHUNK, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        # each tensor in file order, in whole elements: one BLAKE3 and one mask per chunk read
        for b, e, name, st, shape in sorted((b, e, n, st, tuple(sh))
                                            for n, b, e, st, sh in tensors):
            h = blake3.blake3()
            step = CHUNK - CHUNK % np.dtype(_EXPONENT[st][0]).itemsize if st in _EXPONENT \
                else CHUNK
            f.seek(b)
            start = b
            while start < e:
                n = f.readinto(memoryview(buf)[:min(step, e - start)])
                if not n:
                    raise OSError(f"{path} ends at byte {start}, before {e}")
                h.update(buf[:n])
                if st in _EXPONENT:
                    k = _nonfinite(buf[:n], st)
                    if k:
                        bad[name] = bad.get(name, 0) + k
                start += n
            digests[name] = (st, shape, h.hexdigest())
    return FileScan(bad, digests)


def identity(tensors) -> str:
    """One BLAKE3 over the (name, dtype, shape, BLAKE3 of the bytes) lines of every tensor,
    sorted by name: the model's identity (build.json's ``inputs.weights_blake3``, the
    calibration store's and the staged checkpoint's ``weights``), whatever files hold them."""
    import blake3

    h = blake3.blake3()
    for name, dtype, shape, digest in sorted(tensors):
        h.update(f"{name}\t{dtype}\t{list(shape)}\t{digest}\n".encode())
    return h.hexdigest()


class SourceScan:
    """:func:`scan_file` of every weight file, in a background thread (``background=False``: on
    the first question). ``tensors``: file -> [(name, absolute begin, end, safetensors dtype,
    shape)], the model's tensors (convert.source_files.scan_table)."""

    def __init__(self, tensors: dict[Path, list], background: bool = True):
        self._tensors = tensors
        self._done: dict[Path, FileScan] = {}
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

    def wait(self) -> dict[Path, FileScan]:
        if self._thread is None:
            self._run()
            self._thread = threading.current_thread()  # ran
        elif self._thread is not threading.current_thread():
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._done

    def weights_digest(self) -> str:
        """The model's identity (:func:`identity` of its tensors; only the model's: a file's
        tensors that the index leaves out are not)."""
        done = self.wait()
        return identity((t[0], *done[p].tensors[t[0]]) for p, ts in self._tensors.items()
                        for t in ts)

    def nonfinite(self) -> dict[str, int]:
        """tensor -> number of NaN/Inf values, for the tensors that hold any."""
        out: dict[str, int] = {}
        for p, s in sorted(self.wait().items()):
            wanted = {t[0] for t in self._tensors[p]}
            out.update({k: v for k, v in s.nonfinite.items() if k in wanted})
        return dict(sorted(out.items()))
