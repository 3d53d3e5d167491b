"""Check (or, with --add-files, record the ADDED files of) named golden cases only.

``python tools/golden_cases.py pytorch-fp8 pytorch-sq`` runs those cases (pinned environment:
run it under tests/golden/matrix.PINNED_ENV, as tests/test_golden.py does) and compares them
with tests/golden/manifest.json. ``--add-files`` then records files that are new in a case, after
asserting that every previously recorded file of the case has the same hash and that none is
missing: the manifest only grows."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "golden")]

from matrix import MANIFEST, run_matrix  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="+")
    p.add_argument("--add-files", action="store_true")
    args = p.parse_args(argv)
    want = json.loads(MANIFEST.read_text())
    got = run_matrix(args.cases)
    bad, added = [], {}
    for name in args.cases:
        g, w = got["cases"][name], want["cases"][name]
        if g["exit"] != w["exit"]:
            bad.append(f"{name}: exit {g['exit']}, recorded {w['exit']}")
        for path, digest in w["files"].items():
            if g["files"].get(path) != digest:
                bad.append(f"{name}: {path}: {'missing' if path not in g['files'] else 'different bytes'}")
        added[name] = {k: v for k, v in g["files"].items() if k not in w["files"]}
        for path in added[name]:
            print(f"{name}: {path}: new")
    print("\n".join(bad) if bad else f"same bytes: {len(args.cases)} cases (recorded files)")
    if bad:
        return 1
    if args.add_files and any(added.values()):
        for name, files in added.items():
            want["cases"][name]["files"].update(files)
        MANIFEST.write_text(json.dumps(want, indent=1, sort_keys=True) + "\n")
        print(f"recorded the new files in {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
