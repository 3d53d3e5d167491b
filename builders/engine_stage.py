"""``engines.partial``: the stage shared by the runs that build one world's engines.

Each run builds its ranks in a private directory inside the stage, then moves them in
(:func:`land`); the run that lands the last rank renames the stage to ``engines``
(:func:`promote`). ``.fingerprint.json`` (checkpoint config + options) keeps runs with different
inputs from mixing; ``.ranks/rank{r}.json`` records the host and GPU each engine was built on,
since engines run only on the GPU type they were built for (NVIDIA/TensorRT-LLM#222).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path

from common.atomic import write_text
from common.errors import UserError
from common.staged import StagedOutput

FINGERPRINT = ".fingerprint.json"
RANK_RECORDS = ".ranks"
_RANK_FILE = re.compile(r"rank(\d+)[._]")  # rank{r}.engine, rank{r}_managed_weights.safetensors


def engines_stage(engines_dir: Path) -> StagedOutput:
    """``engines_dir`` staged in ``engines.partial`` with its fingerprint record."""
    return StagedOutput(engines_dir, record=FINGERPRINT)


def fingerprint(checkpoint_dir: Path, args: dict) -> dict:
    h = hashlib.sha256((Path(checkpoint_dir) / "config.json").read_bytes())
    h.update(json.dumps(args, sort_keys=True).encode())
    return {"sha256": h.hexdigest()}


# --- GPU types -----------------------------------------------------------------------------------

def gpu_label(gpu: dict) -> str:
    return f"{gpu['name']} (compute capability {gpu['compute_capability']})"


def same_gpu(a: dict | None, b: dict | None) -> bool:
    return a is None or b is None or (a["name"], a["compute_capability"]) == \
        (b["name"], b["compute_capability"])


def host_gpu(backend, devices: list[str]) -> dict | None:
    """The GPU type this run builds on; a host mixing GPU types in one run is refused."""
    gpus = {d: backend.gpu(d) for d in devices}
    known = [(d, g) for d, g in gpus.items() if g is not None]
    for d, g in known[1:]:
        if not same_gpu(known[0][1], g):
            raise UserError(f"GPU {known[0][0]} is {gpu_label(known[0][1])} but GPU {d} is "
                            f"{gpu_label(g)}: the engines of one model must be built on one GPU "
                            f"type; set CUDA_VISIBLE_DEVICES to GPUs of the same type")
    return known[0][1] if known else None


# --- the stage -----------------------------------------------------------------------------------

def read_records(stage: Path) -> dict:
    """rank → where it was built (``.ranks/rank{r}.json``), for the ranks in the stage."""
    out = {}
    for p in sorted((stage / RANK_RECORDS).glob("rank*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def prepare_stage(staged: StagedOutput, fingerprint: dict, gpu: dict | None, subset: bool,
                  force: bool) -> None:
    """Make ``engines.partial`` ready for this run's ranks: a full run starts it afresh; a rank
    subset joins it if it holds ranks of the same inputs built on the same GPU type."""
    stage = staged.stage
    resume = subset and not (force and not read_records(stage))
    refuse = None if force else (
        f"{stage} holds ranks built from another checkpoint or with other engine options; use "
        f"the same ones, or pass --force to discard them")
    if staged.open(fingerprint, resume=resume, refuse=refuse):
        for r, rec in sorted(read_records(stage).items()):
            if not same_gpu(rec.get("gpu"), gpu):
                raise UserError(
                    f"{stage / f'rank{r}.engine'} was built on {gpu_label(rec['gpu'])} "
                    f"(host {rec.get('host')}) but this host's GPU is {gpu_label(gpu)}: "
                    f"TensorRT engines run only on the GPU type they were built for "
                    f"(NVIDIA/TensorRT-LLM#222); build these ranks on a host with that GPU, "
                    f"or rebuild every rank here with --force")
    (stage / "logs").mkdir(parents=True, exist_ok=True)
    (stage / RANK_RECORDS).mkdir(exist_ok=True)


def land(work: Path, stage: Path, ranks: list, version: str | None) -> None:
    """Move this run's finished ranks (engines, rank 0's config.json, logs) into the stage and
    record where each was built; each file is one rename."""
    host = socket.gethostname()
    for rb in ranks:
        names = [p.name for p in work.iterdir() if p.is_file() and (
            _RANK_FILE.match(p.name) and _RANK_FILE.match(p.name).group(1) == str(rb.rank)
            or rb.rank == 0 and not _RANK_FILE.match(p.name))]  # rank 0: config.json & co
        for name in names:
            os.replace(work / name, stage / name)
        os.replace(rb.log, stage / "logs" / rb.log.name)
        rb.log = stage / "logs" / rb.log.name
        record = {"rank": rb.rank, "host": host, "device": rb.device, "gpu": rb.gpu,
                  "tensorrt_llm": version, "blake3": _engine_digest(stage, rb.rank)}
        write_text(stage / RANK_RECORDS / f"rank{rb.rank}.json",
                   json.dumps(record, sort_keys=True) + "\n")


def _engine_digest(stage: Path, rank: int) -> str | None:
    from builders.manifest import file_digest

    engine = stage / f"rank{rank}.engine"
    return file_digest(engine) if engine.is_file() else None


def check_engines(stage: Path, world: int) -> None:
    """Before the engines are put in place (and the Triton repository is filled for them), each
    rank's engine against the digest recorded when it landed: one line naming a changed one."""
    records = read_records(stage)
    for r in range(world):
        want = records.get(r, {}).get("blake3")
        if want is None:
            continue  # landed by a run that recorded no digest
        engine = stage / f"rank{r}.engine"
        got = _engine_digest(stage, r)
        if got != want:
            raise UserError(f"{engine} does not match the BLAKE3 digest recorded when it was "
                            f"built ({want[:16]}..., now {str(got)[:16]}...): it was changed or "
                            f"damaged on disk; rebuild that rank (--ranks {r} --force)")


def complete(stage: Path, world: int) -> bool:
    return (stage / "config.json").is_file() and all(
        (stage / f"rank{r}.engine").is_file() for r in range(world))


def promote(staged: StagedOutput, world: int, wait_s: float = 120.0) -> bool:
    """Rename the complete stage to ``engines`` (replacing an old one only now). Two runs
    landing their last ranks at once: the one that creates ``engines.lock`` renames, the other
    waits for the result."""
    engines_dir = staged.dest
    lock = engines_dir.with_name(engines_dir.name + ".lock")
    try:
        lock.mkdir()
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while lock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return complete(engines_dir, world)
    try:
        if not staged.stage.is_dir():  # promoted by a run that took the lock just before us
            return complete(engines_dir, world)
        check_engines(staged.stage, world)
        staged.promote()
        return True
    finally:
        lock.rmdir()
