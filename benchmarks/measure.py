"""Timed subprocess runs for the benchmarks: wall time and peak RSS of the largest process
(``/usr/bin/time -v``), the peak RSS summed over the process tree (a /proc sampler: what matters for
``--workers``), and the page-cache state of the input (read into it, or evicted)."""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    label: str
    wall: list = field(default_factory=list)       # seconds, one per repeat
    rss_mb: list = field(default_factory=list)     # /usr/bin/time: largest process
    tree_mb: list = field(default_factory=list)    # sampled: sum over the process tree
    stage: list = field(default_factory=list)      # ours: the CLI's "checkpoint ... in Xs"
    phases: list = field(default_factory=list)     # modelopt: imports/load/export split
    note: str = ""
    error: str = ""

    @property
    def t(self):
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def st(self):
        return statistics.median(self.stage) if self.stage else None

    @property
    def rss(self):
        return max(self.rss_mb) if self.rss_mb else float("nan")

    @property
    def tree(self):
        return max(self.tree_mb) if self.tree_mb else float("nan")


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sample_tree(root: int, stop: threading.Event, peak: list):
    """Peak of the RSS summed over ``root``'s descendants (excluding /usr/bin/time itself)."""
    while not stop.is_set():
        kids, todo, total = _children_map(), list(_children_map().get(root, [])), 0
        seen = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += _rss_kb(pid)
            todo += kids.get(pid, [])
        peak[0] = max(peak[0], total)
        stop.wait(0.05)


def timed(cmd: list, log: Path, env=None, cwd=None):
    """Run ``cmd`` under /usr/bin/time -v; return (wall s, max RSS MB, tree peak MB, rc)."""
    subprocess.run(["sync"], check=False)
    with open(log, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=lf, stderr=lf, env=env,
                                cwd=cwd or REPO)
        stop, peak = threading.Event(), [0]
        th = threading.Thread(target=_sample_tree, args=(proc.pid, stop, peak), daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    text = log.read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    return wall, rss, peak[0] / 1024, rc, text


def run_case(res: Result, cmd: list, log: Path, cleanup=(), env=None, cwd=None):
    wall, rss, tree, rc, text = timed(cmd, log, env=env, cwd=cwd)
    if rc != 0:
        body = text.split("\tCommand being timed")[0].strip().splitlines()
        res.error = f"exit {rc}: {body[-1] if body else '?'}"
    else:
        res.wall.append(wall)
        res.rss_mb.append(rss)
        res.tree_mb.append(tree)
        m = re.search(r"^checkpoint: .*\) in ([0-9.]+)s$", text, re.M) or \
            re.search(r"^convert_checkpoint: ([0-9.]+)s$", text, re.M)
        if m:
            res.stage.append(float(m.group(1)))
        m = re.search(r"^modelopt phases: (.*)$", text, re.M)
        if m:
            res.phases.append(m.group(1))
    for c in cleanup:
        shutil.rmtree(c, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    return res


def evict(model: Path):
    """Drop the input's (clean) pages from the page cache: posix_fadvise DONTNEED per file."""
    for f in sorted(model.iterdir()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(model: Path):
    """Read every source file once so all runs see the input in the page cache."""
    buf = bytearray(64 * 2**20)
    for f in sorted(model.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
