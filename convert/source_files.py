"""Which safetensors files make a Hugging Face model, and their headers, checked as strictly as the
safetensors library checks them before a byte of weights is read.

* files: the index's ``weight_map`` (tensor -> file) when there is one, else every
  ``*.safetensors``; every file confined to the model directory (no ``..``, no absolute path, no
  symlink whose target lies elsewhere, except Hugging Face's cache layout, whose snapshot files
  link into the repository's ``blobs/``);
* headers: tensor data contiguous from offset 0 to the end of the file, without gaps or
  overlaps (safetensors' ``validate``: each tensor starts where the previous one ended, and the
  last one ends where the file does), each tensor's span its shape x dtype;
* tensors: a name in two files is refused naming both; with an index, each tensor is read from
  the file the index names, which must hold it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from common.dtypes import DType
from common.errors import UserError
from common.safetensors_header import read_header, tensor_span

INDEX = "model.safetensors.index.json"

def confined(model_dir: Path, entry: str, what: str) -> Path:
    """``model_dir / entry``, refused unless it stays inside ``model_dir``: a relative name
    without ``..``, and, followed through symlinks, a file inside the model directory (or, for a
    snapshot of Hugging Face's cache, inside its repository's ``blobs/``)."""
    rel = PurePosixPath(entry)
    if not entry or rel.is_absolute() or ".." in rel.parts or "\\" in entry:
        raise UserError(f"{what} names {entry!r}, which is outside {model_dir}; a model's files "
                        f"must be inside its directory: fix or re-download the index")
    path = model_dir / rel
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(model_dir))
    roots = [root]
    if root.parent.name == "snapshots":  # ~/.cache/huggingface/hub/models--X/snapshots/REV
        roots.append(root.parent.parent / "blobs")
    if not any(real == r or r in real.parents for r in roots):
        raise UserError(f"{what} names {entry!r}, which leads to {real}, outside {model_dir} "
                        f"(a symlink out of the model directory); copy the file into the model "
                        f"directory")
    return path


def find_files(model_dir: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """(the weight files, the index's tensor -> file map or None when there is no index)."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or \
                    not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("its weight_map must map each tensor name to a shard file name")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e or type(e).__name__}); "
                            f"re-download the model") from None
        by_entry = {e: confined(model_dir, e, str(index)) for e in sorted(set(weight_map.values()))}
        missing = [e for e, p in by_entry.items() if not p.is_file()]
        if missing:
            raise UserError(f"{index} names shard {missing[0]} which is not in {model_dir}: "
                            f"download the missing shard(s)")
        return sorted(set(by_entry.values())), {k: by_entry[v] for k, v in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return [confined(model_dir, f.name, f"{model_dir}") for f in files], None
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise UserError(f"{model_dir} holds only PyTorch pickle weights (*.bin); they can run "
                        f"code when loaded, so they are refused: convert them to safetensors "
                        f"first (e.g. transformers' save_pretrained(safe_serialization=True))")
    raise UserError(f"{model_dir} has no *.safetensors weights")


def tensor_table(model_dir: Path) -> tuple[list[Path], dict, dict]:
    """(files, name -> (file, shape, DType), name -> absolute offset of its first byte); a tensor
    in two files is refused, and an index's map is followed (each mapped tensor must be in its
    file; tensors the index does not map are not the model's)."""
    files, weight_map = find_files(model_dir)
    meta: dict[str, tuple[Path, tuple[int, ...], DType]] = {}
    offsets: dict[str, int] = {}
    for path in files:
        header, data_start = read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, _, dtype = tensor_span(path, name, info)
            if name in meta:
                raise UserError(f"tensor {name} is in both {meta[name][0]} and {path}; a tensor "
                                f"must be in one file: remove the stale shard or re-download")
            meta[name] = (path, tuple(info["shape"]), dtype)
            offsets[name] = data_start + begin
    if weight_map is not None:
        for name, path in weight_map.items():
            if name not in meta or meta[name][0] != path:
                where = f"it is in {meta[name][0]}" if name in meta else "no file holds it"
                raise UserError(f"{model_dir / INDEX} maps tensor {name} to {path.name} but "
                                f"{where}: the index does not match the shards: re-download them")
        meta = {k: v for k, v in meta.items() if k in weight_map}
        offsets = {k: v for k, v in offsets.items() if k in weight_map}
    return files, meta, offsets


def declared_dtype(raw: dict) -> str | None:
    """config.json's ``dtype`` (``torch_dtype`` before transformers 5), as a name."""
    value = raw.get("dtype", raw.get("torch_dtype"))
    return value if isinstance(value, str) else None


def check_float_model(meta: dict, declared: str | None) -> None:
    """A model whose config declares a floating ``torch_dtype`` holds only floating-point
    tensors: an integer dtype in a header (read as weights it would be garbage, e.g. +-inf) is
    refused naming the tensor."""
    if declared is None or declared not in ("float16", "bfloat16", "float32", "float64"):
        return
    for name, (path, _, dtype) in sorted(meta.items()):
        if not dtype.is_floating_point:
            raise UserError(f"tensor {name} in {path} has dtype {dtype.st} but config.json "
                            f"declares a {declared} model, whose weights are floating point; the "
                            f"file is corrupt or not this model's: re-download it")


def scan_table(files, meta: dict, offsets: dict) -> dict[Path, list]:
    """file -> [(tensor, absolute begin, end, safetensors dtype, shape)], what
    ``common.source_scan`` reads."""
    table: dict[Path, list] = {p: [] for p in files}
    for name, (path, shape, dtype) in meta.items():
        n = dtype.itemsize
        for d in shape:
            n *= d
        table[path].append((name, offsets[name], offsets[name] + n, dtype.st, tuple(shape)))
    return table


def file_identity(path: Path) -> str:
    """The identity (common.source_scan.identity) of one weight file's tensors, from the scan
    that also counts their non-finite values (shared with the conversion's: a file is read
    once per run)."""
    from common.source_scan import identity, scan_file

    header, start = read_header(path)
    tensors = [(k, start + v["data_offsets"][0], start + v["data_offsets"][1], v["dtype"],
                tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"]
    found = scan_file(path, tensors).tensors
    return identity((t[0], *found[t[0]]) for t in tensors)


def weights_identity(model_dir: Path) -> str:
    """The model's identity (common.source_scan.identity) over the tensors it is read from,
    through the scan a conversion of the same files already took (else one read now)."""
    from common.source_scan import SourceScan

    files, meta, offsets = tensor_table(model_dir)
    return SourceScan(scan_table(files, meta, offsets), background=False).weights_digest()
