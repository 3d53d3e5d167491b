"""The calibration store: calibrate once, shard many.

A directory (``DIR/calibration/`` of a build, reused with ``--calibration PATH``) holding

* ``calibration.json``: format version, the recipe (format, options), the fingerprint (the
  model's tensor identity and config, calibration token ids, options, compute device type and
  dtype), how many layers are finished, whether it is complete;
* ``layer_NNNNN.safetensors``: that layer's quantized tensors, unsharded, HF names, exactly what
  :func:`quantize.modelopt_state.extract_quant_state` returns for it (prequant scales kept in the
  calibration's own precision; cast to the checkpoint dtype when sharded), plus what the unified
  checkpoint (``--target pytorch``) of the format needs besides (quantize/unified/store_entries.py);
* ``inputs_NNNNN.safetensors`` (while calibrating): the inputs of the next layer to calibrate, one
  set per forward-loop pass, so that an interrupted calibration resumes from the last finished
  layer with the same bytes.

Every file is written under a temporary name and renamed, the manifest last.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from common.digests import file_blake3
from common.errors import UserError
from common.staged import StagedOutput

from .direct_save import save

MANIFEST = "calibration.json"
VERSION = 2  # 2: ``weights`` is the tensors' identity (1: the files')


def fingerprint(config_json: Path, batches: list[torch.Tensor], spec, device_type: str,
                compute_dtype: torch.dtype, weights: str | None = None) -> dict:
    """What decides a calibration's result: the model's tensors (``weights``: the BLAKE3 identity
    of their names, dtypes, shapes and bytes, common.source_scan; not the files that hold them,
    so the same model re-sharded or saved again with other header metadata is the same), its
    config, the calibration token ids, the format's options and where (CPU fp32 vs GPU half
    precision) it runs."""
    ids = hashlib.sha256()
    for b in batches:
        ids.update(str(list(b.shape)).encode())
        ids.update(b.to(torch.int64).numpy().tobytes())
    return {"weights": weights,
            "config": hashlib.sha256(config_json.read_bytes()).hexdigest(),
            "calibration_ids": ids.hexdigest(),
            "recipe": recipe(spec),
            "device": device_type, "compute_dtype": str(compute_dtype).replace("torch.", "")}


def recipe(spec) -> dict:
    return {"format": spec.name, "quant_algo": spec.quant_algo,
            "kv_cache_quant_algo": spec.kv_cache_quant_algo,
            "smoothquant_alpha": getattr(spec, "smoothquant_alpha", None),
            "group_size": spec.group_size, "calib_size": spec.calib_size,
            "calib_seq_len": spec.calib_seq_len, "calib_batch_size": spec.calib_batch_size,
            # max-calibrated formats are calibrated by our own hooks (no modelopt import)
            "modelopt_config": spec.format.calibration_fingerprint(spec)}


def _staged(store: Path) -> StagedOutput:
    """The store as a staged output used in place (it is reused by path, never promoted): its
    fingerprint and format version are keys of its manifest."""
    return StagedOutput(store, stage=store, record=MANIFEST, keys=("version", "fingerprint"),
                        dump=lambda data: json.dumps(data, indent=2) + "\n")


def read_manifest(store: Path) -> dict | None:
    return _staged(store).read_record()


def _write_manifest(store: Path, man: dict) -> None:
    _staged(store).write_record(man)


def begin(store: Path, fp: dict, model: str | None = None) -> dict:
    """The manifest to continue from: the existing one when its fingerprint is ``fp`` (resume, or
    complete), else a fresh, empty store (``model``: the model's directory, named when another
    model's run would reuse it)."""
    staged, key = _staged(store), {"version": VERSION, "fingerprint": fp}
    man = {**key, "model": model, "layers_done": 0, "complete": False}
    if staged.open(key, record=man):
        old = staged.read_record()
        if _well_formed(old):
            return old
        staged.open(key, resume=False, record=man)  # a damaged manifest: calibrate afresh
    return man


def _well_formed(man) -> bool:
    """A manifest as this module writes it (a damaged one is never trusted)."""
    return isinstance(man, dict) and isinstance(man.get("fingerprint"), dict) and \
        type(man.get("layers_done")) is int and man["layers_done"] >= 0 and \
        isinstance(man.get("complete"), bool)


def check_reusable(store: Path, fp: dict, model: str | None = None) -> dict:
    """``--calibration PATH``: its manifest when complete and made from the same inputs (the same
    weight bytes included); else one line, naming both models when the weights differ."""
    man = read_manifest(store)
    if man is None and not (store / MANIFEST).is_file():
        raise UserError(f"--calibration {store} holds no {MANIFEST}; give the calibration/ "
                        f"directory of an earlier build")
    if not _well_formed(man):
        raise UserError(f"--calibration {store / MANIFEST} is not a calibration manifest as "
                        f"build_engine writes it (damaged or edited); give the calibration/ "
                        f"directory of an earlier build, or drop --calibration to calibrate afresh")
    if man.get("version") != VERSION:
        raise UserError(f"--calibration {store} was written by another build_engine version "
                        f"(store format {man.get('version')}, this one reads {VERSION}); drop "
                        f"--calibration to calibrate afresh")
    if not man.get("complete"):
        raise UserError(f"--calibration {store} is incomplete ({man.get('layers_done', 0)} "
                        f"layers); rerun the build that made it to finish it")
    old = man.get("fingerprint", {})
    if old.get("weights") != fp.get("weights"):
        raise UserError(f"--calibration {store} was calibrated from the model in "
                        f"{man.get('model') or 'another directory'} (weights blake3 "
                        f"{str(old.get('weights'))[:16]}), not from --model {model} (weights "
                        f"blake3 {str(fp.get('weights'))[:16]}): a calibration holds for the "
                        f"weights it was made from; drop --calibration to calibrate this model")
    diff = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
    if diff:
        raise UserError(f"--calibration {store} was made from other inputs ({', '.join(diff)} "
                        f"differ); use the same model, calibration text and quantization flags, "
                        f"or drop --calibration to calibrate afresh")
    return man


def layer_path(store: Path, i: int) -> Path:
    return store / f"layer_{i:05d}.safetensors"


def _inputs_file(store: Path, i: int) -> Path:
    return store / f"inputs_{i:05d}.safetensors"


def finish_layer(store: Path, i: int, state: dict, next_inputs) -> None:
    """Record layer ``i`` finished: its tensors, the next layer's inputs, then the manifest."""
    path = layer_path(store, i)
    tmp = path.with_name(path.name + ".tmp")
    written = {path.name: save(state, str(tmp))}  # O_DIRECT: the page cache's CPU stays with
    os.replace(tmp, path)                          # the next layer; hashed as written
    if next_inputs is not None:
        distinct, index = [], []
        for p in next_inputs:
            j = next((k for k, d in enumerate(distinct) if d is p), None)
            if j is None:
                distinct.append(p)
                j = len(distinct) - 1
            index.append(j)
        tensors = {f"p{k}.b{b}": t.contiguous().cpu() for k, p in enumerate(distinct)
                   for b, t in enumerate(p)}
        ipath = _inputs_file(store, i + 1)
        tmp = ipath.with_name(ipath.name + ".tmp")
        written[ipath.name] = save(tensors, str(tmp), metadata={
            "passes": ",".join(map(str, index)), "batches": str(len(next_inputs[0]))})
        os.replace(tmp, ipath)
    man = read_manifest(store)
    man["layers_done"] = i + 1
    digests = man.setdefault("blake3", {})
    digests.pop(_inputs_file(store, i).name, None)
    digests.update(written)
    _write_manifest(store, man)
    _inputs_file(store, i).unlink(missing_ok=True)


def verified(store: Path, man: dict, path: Path) -> Path:
    """``path`` (a file of the store) after checking its bytes against the BLAKE3 digest the
    manifest recorded when it was written; a mismatch (or no digest) is one line, exit 2."""
    want = man.get("blake3", {}).get(path.name)
    got = file_blake3(path) if path.is_file() else None
    if want is None or got != want:
        how = "has no recorded digest" if want is None else (
            "is missing" if got is None else
            f"does not match the BLAKE3 digest recorded when it was written ({want[:16]}..., "
            f"now {got[:16]}...)")
        raise UserError(f"calibration store file {path} {how}: it was changed or damaged on "
                        f"disk; delete {store} and calibrate again")
    return path


def verify_layers(store: Path, man: dict) -> None:
    """Every layer file of a complete store, checked against its recorded digest before use."""
    for i in range(man.get("num_layers") or 0):
        verified(store, man, layer_path(store, i))


def load_inputs(store: Path, device) -> list[list[torch.Tensor]]:
    """The saved inputs of the next layer to calibrate (per pass, per batch), checked against
    their recorded digest."""
    man = read_manifest(store)
    path = verified(store, man, _inputs_file(store, man["layers_done"]))
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata()
        n = int(meta["batches"])
        distinct = {}
        index = [int(x) for x in meta["passes"].split(",")]
        for j in sorted(set(index)):
            distinct[j] = [f.get_tensor(f"p{j}.b{b}") for b in range(n)]
    return [distinct[j] for j in index]


def complete(store: Path, num_layers: int, seconds: float) -> dict:
    man = read_manifest(store)
    man.update(complete=True, num_layers=num_layers, seconds=round(seconds, 3))
    for p in store.glob("inputs_*.safetensors"):
        p.unlink()
        man.get("blake3", {}).pop(p.name, None)
    _write_manifest(store, man)
    return man


_PQS = "prequant_scaling_factor"


def load_layer(store: Path, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer ``i``'s unsharded tensors, prequant scales in the checkpoint ``dtype`` (as modelopt
    writes them)."""
    out = {}
    with safe_open(str(layer_path(store, i)), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = t.to(dtype) if k.endswith(_PQS) else t
    return out


def num_layers(store: Path) -> int:
    return len([p for p in store.glob("layer_*.safetensors") if re.match(r"layer_\d+\.", p.name)])
