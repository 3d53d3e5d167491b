"""The markdown of the conversion benchmark: machine line, the side-by-side table, and the
markers block it replaces in BENCHMARKS.md."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine_info() -> dict:
    import torch

    mem = next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]
    disk = "?"
    try:
        dev = subprocess.run(["df", "--output=source", str(REPO)], capture_output=True,
                             text=True).stdout.split()[-1]
        fs = subprocess.run(["df", "--output=fstype", str(REPO)], capture_output=True,
                            text=True).stdout.split()[-1]
        blk = Path("/sys/block") / Path(dev).name
        rot = (blk / "queue/rotational").read_text().strip() if blk.exists() else "?"
        disk = f"{dev} ({fs}; virtio block device, rotational={rot})" if "vd" in dev else \
            f"{dev} ({fs}, rotational={rot})"
    except Exception:
        pass
    cpu = "?"
    try:
        cpu = next(l for l in open("/proc/cpuinfo") if l.startswith("model name")).split(":")[1].strip()
    except Exception:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(int(mem) / 2**20, 1),
            "disk": disk, "python": platform.python_version(), "torch": torch.__version__,
            "kernel": platform.release()}


def fmt_table(rows, cp_t, cpsync_t, gb) -> str:
    out = ["| run | wall s | × cp | × cp+fsync | GB/s | convert stage s (× cp+fsync) "
           "| peak RSS MB (largest process) | peak RSS MB (process tree) | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error or not r.wall:
            out.append(f"| {r.label} | – | – | – | – | – | – | – | {r.error or r.note} |")
            continue
        stage = f"{r.st:.1f} ({r.st / cpsync_t:.2f})" if r.st is not None else ""
        runs = "" if len(r.wall) < 2 else f"runs: {', '.join(f'{w:.1f}' for w in r.wall)}"
        phases = r.phases[len(r.phases) // 2] if r.phases else ""
        note = "; ".join(x for x in (r.note, phases, runs) if x)
        out.append(f"| {r.label} | {r.t:.1f} | {r.t / cp_t:.2f} | {r.t / cpsync_t:.2f} | "
                   f"{gb / r.t:.2f} | {stage} | {r.rss:.0f} | {r.tree:.0f} | {note} |")
    return "\n".join(out)


def write_md(path: Path, block: str, marks: tuple[str, str] = (MARK_BEGIN, MARK_END)) -> None:
    """Put ``block`` between a benchmark's ``marks`` in ``path`` (appended the first time)."""
    begin, end = marks
    text = path.read_text() if path.exists() else ""
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + new + text[b:]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + new + "\n"
    path.write_text(text)


def targets(tt: int, cp, cps, tgt, lib, direct_lib, mo_t, flat_rows) -> list[tuple[str, str, bool]]:
    """(target, measured, met) rows: the issue's targets from the results of one run."""
    checks = []
    if tgt is not None and tgt.wall:
        checks.append((f"`build_engine` fp16 tp {tt}, whole command ≤ 1.3 × cp+fsync",
                       f"{tgt.t / cps.t:.2f}×", tgt.t <= 1.3 * cps.t))
        checks.append((f"`build_engine` fp16 tp {tt}, whole command ≤ 1.5 × plain cp (no fsync)",
                       f"{tgt.t / cp.t:.2f}×", tgt.t <= 1.5 * cp.t))
        if tgt.st is not None:
            checks.append((f"`build_engine` fp16 tp {tt}, its checkpoint stage (config read, plan, "
                           f"read, write, fsync) ≤ 1.5 × cp+fsync", f"{tgt.st / cps.t:.2f}×",
                           tgt.st <= 1.5 * cps.t))
        if lib.st is not None:
            checks.append((f"fp16 tp {tt}, `convert_checkpoint()` after imports (plan, read, shard, "
                           f"write, fsync, verify) ≤ 1.5 × cp+fsync", f"{lib.st / cps.t:.2f}×",
                           lib.st <= 1.5 * cps.t))
        if direct_lib is not None and direct_lib.st is not None:
            checks.append(("the same with BUILD_ENGINE_DIRECT_IO=0 ≤ 1.5 × cp+fsync",
                           f"{direct_lib.st / cps.t:.2f}×", direct_lib.st <= 1.5 * cps.t))
        checks.append(("our peak RSS ≤ 1 GB", f"{tgt.rss:.0f} MB", tgt.rss <= 1024))
        if mo_t is not None and mo_t.wall:
            checks.append(("≥ 3× faster than modelopt", f"{mo_t.t / tgt.t:.1f}×",
                           mo_t.t >= 3 * tgt.t))
            checks.append(("≤ 1/4 of modelopt's peak RSS", f"{tgt.rss / mo_t.rss:.3f}",
                           tgt.rss <= mo_t.rss / 4))
    if flat_rows and flat_rows[-1][2].wall and flat_rows[-1][3].wall:
        n, fsize, r, rc = flat_rows[-1]
        checks.append((f"`build_engine` fp16 tp {tt}, {n} layers ({fsize:.1f} GB), whole command "
                       f"≤ 1.0 × cp+fsync", f"{r.t / rc.t:.2f}×", r.t <= rc.t))
    if len(flat_rows) >= 2:
        lo, hi = flat_rows[0][2], flat_rows[-1][2]
        if lo.wall and hi.wall:
            checks.append((f"peak RSS flat from {flat_rows[0][0]} to {flat_rows[-1][0]} layers "
                           f"(within 10%)", f"{lo.rss:.0f} → {hi.rss:.0f} MB",
                           hi.rss <= 1.1 * lo.rss and hi.rss <= 1024))
    return checks


def flat_table(flat_rows) -> list[str]:
    """Our whole command vs cp+fsync at each layer count: wall, ratio, peak RSS."""
    if not flat_rows:
        return []
    lines = ["| flatness run | wall s | GB/s | cp+fsync s | × cp+fsync | peak RSS MB | tree RSS MB | "
             "runs (ours; cp+fsync) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for n, fsize, r, rc in flat_rows:
        if not (r.wall and rc.wall):
            lines.append(f"| {r.label} | – | – | – | – | – | – | {r.error or rc.error} |")
            continue
        runs = ", ".join(f"{x:.1f}" for x in r.wall) + "; " + ", ".join(f"{x:.1f}" for x in rc.wall)
        lines.append(f"| {r.label} | {r.t:.1f} | {fsize / r.t:.2f} | {rc.t:.1f} | {r.t / rc.t:.2f} | "
                     f"{r.rss:.0f} | {r.tree:.0f} | {runs} |")
    return lines + [""]
