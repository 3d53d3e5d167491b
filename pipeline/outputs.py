"""What a run writes into OUTPUT, what it may replace or delete there, and the refusals of that
(in the plan, before any work): only the tool's own outputs are ever replaced (``--force``) or
deleted (common.ownership); an existing output needs ``--force``; no input of the run may lie
under a path the run replaces; and a new checkpoint makes the outputs built from the old one
stale (removed when it is put in place, so build.json and launch_triton.sh never name them)."""
from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError
from common.ownership import foreign, inside, refuse_foreign, remove_owned

#: built from a checkpoint: stale once another checkpoint replaces it
DERIVED = ("engines", "engines.partial", "triton", "lora")
MANIFEST = "build.json"


def replaced(plan) -> tuple[list[str], list[str]]:
    """(the outputs this run writes and so replaces, the stages and derived outputs it may delete)
    as names under ``plan.out``."""
    writes, deletes = [], []
    if plan.target == "pytorch":
        writes.append("hf_quantized")
        deletes += ["hf_quantized.partial", "hf_quantized.calibration"]
    elif plan.from_checkpoint is None:
        writes.append("checkpoint")
        deletes += ["checkpoint.partial", *DERIVED]
        cal = plan.calibration
        if cal is not None and not cal.reuse and inside(cal.store, plan.out):
            deletes.append(os.path.relpath(cal.store, plan.out))
    if getattr(plan, "lora", None) is not None:
        writes.append("lora")
        deletes.append("lora.partial")
    if plan.target == "engine" and not plan.checkpoint_only:
        writes.append("engines")
        deletes.append("engines.partial")
    if plan.triton_target != "none" and not plan.checkpoint_only:
        writes.append("triton")
    return writes, [d for d in dict.fromkeys(deletes) if d not in writes]


def check(plan, inputs: dict) -> None:
    """The refusals (one line, exit 2, nothing written) for ``plan``'s outputs; ``inputs``: what
    the run reads, by what names it (flag -> path)."""
    writes, deletes = replaced(plan)
    paths = [plan.out / n for n in writes + deletes]
    for flag, src in inputs.items():
        if src is None:
            continue
        for p in paths:
            if inside(src, p):
                raise UserError(f"{flag} {src} lies inside {p}, which this run replaces or "
                                f"deletes: choose another --output (or move the input)")
    subset = plan.ranks_text is not None
    for name in writes:
        p = plan.out / name
        if os.path.lexists(p):
            if not plan.force:
                raise UserError(f"{p} already exists: choose another --output or pass --force "
                                f"to replace it")
            refuse_foreign(p)
    for name in deletes:
        why = foreign(plan.out / name)
        if why is not None:
            raise UserError(f"{why}: build_engine will not delete it; move it out of the way "
                            f"(or remove it yourself) or choose another --output")
    if plan.target == "engine" and plan.from_checkpoint is None and not plan.force and not subset:
        for name in DERIVED:  # built from some other checkpoint: would be adopted as this one's
            if os.path.lexists(plan.out / name):
                raise UserError(f"{plan.out / name} exists (built from an earlier checkpoint): "
                                f"pass --force to replace it, or choose another --output")


def remove_stale(out: Path, names=DERIVED + (MANIFEST,)) -> list[str]:
    """After a new checkpoint is put in place: the tool's own outputs built from the one it
    replaced go (refused, one line, if one is not provably the tool's); what was removed."""
    gone = []
    for name in names:
        p = Path(out) / name
        if name == MANIFEST:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                gone.append(name)
        elif remove_owned(p):
            gone.append(name)
    return gone
