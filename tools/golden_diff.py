"""Which golden files a re-record changed: the manifest at a git revision against the working tree.

``python tools/golden_diff.py [REV]`` (default ``HEAD``) prints, per case, the files whose hash
changed, appeared or disappeared, and the cases whose exit status changed, so that a re-record
(``tests/golden/matrix.py --write``) can be reviewed against the reason given for it."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "tests/golden/manifest.json"


def diff(old: dict, new: dict) -> list[str]:
    lines = []
    for case in sorted(set(old["cases"]) | set(new["cases"])):
        o, n = old["cases"].get(case), new["cases"].get(case)
        if o is None or n is None:
            lines.append(f"{case}: case {'added' if o is None else 'removed'}")
            continue
        if o["exit"] != n["exit"]:
            lines.append(f"{case}: exit {o['exit']} -> {n['exit']}")
        for path in sorted(set(o["files"]) | set(n["files"])):
            a, b = o["files"].get(path), n["files"].get(path)
            if a != b:
                what = "new" if a is None else "gone" if b is None else "changed"
                lines.append(f"{case}: {path}: {what}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", nargs="?", default="HEAD")
    args = p.parse_args(argv)
    old = json.loads(subprocess.run(["git", "show", f"{args.rev}:{MANIFEST}"], cwd=REPO,
                                    check=True, capture_output=True, text=True).stdout)
    new = json.loads((REPO / MANIFEST).read_text())
    lines = diff(old, new)
    print("\n".join(lines) if lines else "no golden file changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
