"""``DIR/build.json``: what went in, with which options and software, how long each stage took,
and every file that came out (BLAKE3 digest + size).

File digests are BLAKE3 (``"blake3": hex``, what ``b3sum FILE`` prints; schema 2, which replaced
schema 1's sha256): hashing every input and output file with sha256 was the CPU bottleneck of
the float conversion, and one core hashes BLAKE3 ~3x faster. The model's own safetensors files
are listed by the identity of their tensors instead (``"tensors_blake3"``, schema 3,
common.source_scan.identity), taken in the one read that also gives the model's identity
(``inputs.weights_blake3``) and its NaN/Inf counts; nothing verifies an input file by its bytes. Output files the converter wrote in
this run carry the digest its writer took while writing them (the run's
``common.digests.Digests``, handed to :func:`write_manifest`: same inode, size and mtime), so
they are not read back; other files are hashed in fixed-size chunks
(files can be many GB). Keys are written sorted and
lists are in a fixed order (files sorted by path), so two builds with the same inputs, options
and outputs differ only in timings and the creation time. The file is written to a temporary
name and renamed, so a ``build.json`` is always complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import enum
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from common.atomic import write_text
from common.digests import Digests
from common.versions import software_versions

MANIFEST_NAME = "build.json"
SCHEMA_VERSION = 3  # 3: a model's safetensors files by their tensors ("tensors_blake3");
# 2: file digests are BLAKE3 ("blake3"), 1: sha256 ("sha256")
CHUNK_BYTES = 8 * 2**20

# files of a HF model directory worth hashing: weights, configs, tokenizer files
_INPUT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt",
                   ".tiktoken", ".py"}


def file_digest(path, chunk_size: int = CHUNK_BYTES) -> str:
    """The BLAKE3 digest (hex) of a file, read ``chunk_size`` bytes at a time."""
    h = blake3.blake3()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _digest_of(path: Path, digests: Digests | None, scan: bool = False) -> tuple[str, str]:
    """(field, hex): ``blake3``, the writer's digest of a file it wrote (unchanged since), else
    the file read and hashed; with ``scan``, a model's safetensors file is ``tensors_blake3``,
    the identity of its tensors from the model's one scan, which the conversion shares
    (convert.source_files.file_identity; a whole-file digest would take a second pass)."""
    known = digests.known(path) if digests is not None else None
    if known is None and scan and path.suffix == ".safetensors":
        from common.errors import UserError
        from convert.source_files import file_identity

        try:
            return "tensors_blake3", file_identity(path)
        except UserError:
            pass  # not a readable safetensors file: its bytes are still hashed
    return "blake3", known or file_digest(path)


def _jsonable(value):
    """Options and inputs as plain JSON (paths → str, dataclasses/Namespaces → dicts; a dataclass
    with its own ``as_dict``, such as EngineOptions without LoRA, as it reads itself)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.as_dict() if hasattr(value, "as_dict") else dataclasses.asdict(value)
    elif isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _hash_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _file_entries(root: Path, *, exclude: set[Path] = frozenset(),
                  suffixes: set[str] | None = None, recursive: bool = True,
                  threads: int | None = None, digests: Digests | None = None,
                  scan: bool = False, only=None) -> list[dict]:
    """Path, size and BLAKE3 digest of the files under ``root``, sorted by path. Files are hashed
    in parallel threads (blake3 releases the GIL on large buffers: ~5 GB/s per core here;
    ``threads``: how many, default one per core up to 4). ``only``: the top-level names to
    list (None: all)."""
    root = Path(root)
    paths = root.rglob("*") if recursive else root.iterdir()
    chosen = []
    for p in paths:
        if not p.is_file() or p.is_symlink() or p.resolve() in exclude:
            continue
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # caches, partial files, ownership markers
        if only is not None and rel.parts[0] not in only:
            continue  # not this run's output
        if suffixes is not None and p.suffix.lower() not in suffixes:
            continue
        chosen.append((rel.as_posix(), p))
    # biggest first, so one large file does not start last
    chosen.sort(key=lambda item: -item[1].stat().st_size)
    with ThreadPoolExecutor(max_workers=threads or _hash_threads()) as pool:
        hexes = list(pool.map(lambda item: _digest_of(item[1], digests, scan), chosen))
    entries = [{"path": rel, "size": p.stat().st_size, field: d}
               for (rel, p), (field, d) in zip(chosen, hexes)]
    return sorted(entries, key=lambda e: e["path"])


class InputHashing:
    """:func:`describe_inputs` started in a background thread, so hashing the model's shards
    overlaps the conversion (which waits on the disk most of the time) instead of following it.
    One thread: BLAKE3 hashes ~5 GB/s on one core, ~3 GB/s with the reads from the page cache
    (measured: 2.14 GB in 0.5-0.8 s of CPU), so a 7B-shaped 8-layer model (3.76 GB) takes ~1 s,
    well within a conversion that moves the same bytes at the disk's pace, while a thread per
    core would take CPU from the conversion's copy and its own hash of the outputs. Pass it as
    ``inputs=`` to :func:`write_manifest`; ``result()`` waits for it."""

    def __init__(self, inputs: dict):
        self._inputs, self._result, self._error = dict(inputs), None, None
        # a daemon thread: a run that fails or is interrupted exits without waiting for it
        self._thread = threading.Thread(target=self._run, name="hash-inputs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = describe_inputs(self._inputs, threads=1)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def result(self) -> dict:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _weights_identity(model_dir: Path) -> str | None:
    """The model's identity (common.source_scan.identity: its tensors' names, dtypes, shapes and
    bytes, whatever files hold them); None when it cannot be told (no readable safetensors)."""
    from common.errors import UserError
    from convert.source_files import weights_identity

    try:
        return weights_identity(model_dir)
    except UserError:
        return None


def describe_inputs(inputs: dict, threads: int | None = None) -> dict:
    """``inputs`` with ``model_dir`` (or ``model``) expanded: its absolute path, the BLAKE3
    digest and size of each weight shard, config and tokenizer file at its top level, and
    ``weights_blake3``, the weights' identity over their tensors that the calibration store and
    a resumed checkpoint compare (common.source_scan.identity)."""
    out = _jsonable(dict(inputs))
    key = "model_dir" if "model_dir" in inputs else ("model" if "model" in inputs else None)
    if key is not None and inputs[key] is not None and Path(inputs[key]).is_dir():
        model_dir = Path(inputs[key]).resolve()
        out[key] = str(model_dir)
        out["model_files"] = _file_entries(model_dir, suffixes=_INPUT_SUFFIXES, recursive=False,
                                           threads=threads, scan=True)
        out["weights_blake3"] = _weights_identity(model_dir)
    return out


def build_manifest(output_dir, *, inputs: "dict | InputHashing", options: dict, stage_timings: dict,
                   outputs_root=None, engines: dict | None = None,
                   layout: dict | None = None, digests: Digests | None = None,
                   only=None) -> dict:
    """The manifest as a dict (what :func:`write_manifest` writes)."""
    output_dir = Path(output_dir)
    outputs_root = Path(outputs_root) if outputs_root is not None else output_dir
    manifest_path = (output_dir / MANIFEST_NAME).resolve()
    timings = {str(k): (round(float(v), 3) if v is not None else None)
               for k, v in dict(stage_timings).items()}
    manifest = {
        "schema": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "inputs": inputs.result() if isinstance(inputs, InputHashing) else describe_inputs(inputs),
        "options": _jsonable(options),
        "versions": software_versions(),
        "stage_timings_s": timings,
        "outputs": {
            "root": str(outputs_root.resolve()),
            "files": _file_entries(outputs_root, exclude={manifest_path}, digests=digests,
                                   only=only),
        },
    }
    if engines is not None:
        manifest["engines"] = _jsonable(engines)
    if layout:
        manifest["layout"] = _jsonable(layout)
    return manifest


def write_manifest(output_dir, *, inputs: "dict | InputHashing", options: dict, stage_timings: dict,
                   outputs_root=None, engines: dict | None = None,
                   layout: dict | None = None, digests: Digests | None = None,
                   only=None) -> Path:
    """Write ``output_dir/build.json`` and return its path.

    inputs: e.g. ``{"model_dir": DIR, "model": "smollm2"}`` — ``model_dir`` is expanded into
        the BLAKE3 digest of each shard; other keys are recorded as given.
    options: every option of the run (a dict, dataclass or argparse Namespace).
    stage_timings: stage name → seconds.
    outputs_root: the directory whose files are listed (default ``output_dir``); build.json
        itself is never listed.
    engines: the engine stage's record (ranks built here, host and GPU of every rank, whether
        the world is complete), written as ``engines``.
    layout: how the model was laid out beyond the options, e.g. ``{"head_padding": {...}}``
        (``model.shape.HeadPadding.as_dict``: head counts and the extra cost), or ``None``.
    digests: the run's :class:`common.digests.Digests`, which its writers filled: those files
        are not read back.
    only: the names under ``outputs_root`` this run wrote (build_engine: ``BuildResult.outputs``);
        nothing else there is listed (an earlier run's or a user's files are not this build's).
        None lists every file.
    """
    output_dir = Path(output_dir)
    manifest = build_manifest(output_dir, inputs=inputs, options=options,
                              stage_timings=stage_timings, outputs_root=outputs_root,
                              engines=engines, layout=layout, digests=digests, only=only)
    path = output_dir / MANIFEST_NAME
    output_dir.mkdir(parents=True, exist_ok=True)  # --from-checkpoint may have written nothing else
    write_text(path, json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return path


def check_listed(directory) -> None:
    """Before a directory this tool wrote is used again (``--from-checkpoint DIR/checkpoint``):
    when the ``build.json`` beside it lists its files, each listed file that is there must have
    the listed BLAKE3 digest; a missing or changed one is one line naming it (exit 2)."""
    from common.errors import UserError

    directory = Path(directory).resolve()
    manifest = directory.parent / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["outputs"]["files"]  # relative to build.json's directory (its outputs root,
        prefix = directory.name + "/"      # wherever the output was moved since)
    except (OSError, ValueError, KeyError, TypeError):
        return  # no build.json of this output, or one that does not list this directory
    for entry in files:
        path = entry.get("path", "") if isinstance(entry, dict) else ""
        if not path.startswith(prefix) or "/" in path[len(prefix):]:
            continue
        name = path[len(prefix):]
        if not (name == "config.json" or name.endswith(".safetensors")):
            continue
        full = directory / name
        if not full.is_file():
            raise UserError(f"{full} is listed in {manifest} but missing; the checkpoint is "
                            f"incomplete: convert it again")
        got = file_digest(full)
        if got != entry.get("blake3"):
            raise UserError(f"{full} does not match its BLAKE3 digest in {manifest} "
                            f"({str(entry.get('blake3'))[:16]}..., now {got[:16]}...): it was "
                            f"changed or damaged after it was written; convert it again")
