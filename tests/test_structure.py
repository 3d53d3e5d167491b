"""Issue 23's structure criteria as a ratchet (tools/structure.py measures; see its docstring for
what counts).

tests/structure_baseline.json records today's violations without line numbers. A violation that is
not in it fails (fix it, or add it there with a reason); a baseline entry that no longer occurs
fails too (remove it), so the baseline only shrinks and always says what is left. Where a target
already holds, it is asserted outright. ``python tools/structure.py --write-baseline`` regenerates
the baseline (keeping its reasons).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "tests" / "structure_baseline.json"


def _load_tool():
    spec = importlib.util.spec_from_file_location("structure_tool", REPO / "tools" / "structure.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


structure = _load_tool()


@pytest.fixture(scope="module")
def report():
    return structure.analyze(REPO)


def test_structure_matches_baseline(report):
    problems = structure.compare(structure.baseline_of(report), json.loads(BASELINE.read_text()))
    assert not problems, "\n" + "\n".join(problems)


def test_targets_that_already_hold(report):
    """Issue 23's targets where they hold today: asserted outright, not through the baseline."""
    mods = structure.load_modules(REPO)
    graph = structure.import_graph(mods)
    # no module imports itself
    assert not [m for m, t in graph.items() if m in t]
    # no import cycle spans two top-level packages (the ones left are inside one package)
    assert not [c for c in report["cycles"] if len({m.split(".")[0] for m in c}) > 1]
    # common/ is the ground floor: it imports no other project package
    assert not sorted({(m, t) for m, ts in graph.items() if m.split(".")[0] == "common"
                       for t in ts if t.split(".")[0] != "common"})
    # convert/ and model/ import neither quantize nor torch, at any level (issue 23)
    assert not report["forbidden_imports"], report["forbidden_imports"]
    # the packages measured are pyproject.toml's, and they are there
    assert {"common", "convert", "quantize", "verify", "builders", "examples"} <= set(report["packages"])
    assert report["modules"] > 50


def test_baseline_has_no_line_numbers():
    base = json.loads(BASELINE.read_text())
    for cat in ("forbidden_imports", "private_imports", "long_functions", "long_files"):
        for key in base[cat]:
            assert not any(part.strip().isdigit() for part in key.replace(" ", ":").split(":")), key


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))


def test_analyzer_finds_each_kind_of_violation(tmp_path):
    """The instrument itself, on a synthetic package with one violation of each kind (so the ratchet
    cannot pass because the analyzer finds nothing)."""
    _write(tmp_path, "pyproject.toml", """\
        [tool.setuptools]
        packages = ["convert", "quantize", "quantize.recipes", "tools_like"]
        """)
    _write(tmp_path, "convert/__init__.py", "")
    # a cycle a <-> b, through a relative import inside a function
    _write(tmp_path, "convert/a.py", """\
        from convert import b

        def f():
            return b.g()
        """)
    _write(tmp_path, "convert/b.py", """\
        def g():
            from . import a
            return a
        """)
    # a forbidden import (inside a function), a private import, a format branch, a config.json read
    long_body = "\n".join(f"    x{i} = {i}" for i in range(61))
    _write(tmp_path, "convert/c.py", f"""\
import json

def conv(spec, d):
    from quantize.formats import _private_helper
    if spec.quant_algo == "FP8":
        return json.loads((d / "config.json").read_text())

def long_one():
{long_body}
    return x0
""")
    _write(tmp_path, "quantize/__init__.py", "")
    _write(tmp_path, "quantize/formats.py", """\
        from dataclasses import dataclass

        FP8 = "FP8"

        def _private_helper():
            pass

        @dataclass
        class QuantSpec:
            quant_algo: str | None = None

            @property
            def is_brand_new(self) -> bool:
                return self.quant_algo == FP8
        """)
    # in recipes/: a branch that is allowed there, and a use of the discovered predicate
    _write(tmp_path, "quantize/recipes/__init__.py", "")
    _write(tmp_path, "quantize/recipes/fp8.py", """\
        def use(spec):
            return spec.is_brand_new
        """)
    _write(tmp_path, "tools_like/__init__.py", "")
    _write(tmp_path, "tools_like/big.py", "x = 1\n" * 401)
    _write(tmp_path, "tools_like/tests/test_ignored.py", "import torch\n")  # tests/ is not package code

    r = structure.analyze(tmp_path)
    assert r["cycles"] == [["convert.a", "convert.b"]]
    assert [(d["file"], d["module"]) for d in r["forbidden_imports"]] == [("convert/c.py", "quantize.formats")]
    assert [(d["file"], d["name"]) for d in r["private_imports"]] == [
        ("convert/c.py", "quantize.formats._private_helper")]
    assert "is_brand_new" in r["format_predicates"] and "FP8" in r["format_constants"]
    assert r["format_branches_per_file"] == {"convert/c.py": 1, "quantize/formats.py": 1,
                                             "quantize/recipes/fp8.py": 1}
    assert r["format_branches_outside_recipes"] == 2
    assert [(d["file"], d["qualname"], d["lines"]) for d in r["long_functions"]] == [
        ("convert/c.py", "long_one", 63)]
    assert [d["file"] for d in r["long_files"]] == ["tools_like/big.py"]
    assert [(d["file"], d["call"]) for d in r["config_reads"]] == [("convert/c.py", "json.loads")]

    # and the ratchet reports each, new against an empty baseline and gone against a stale one
    base = structure.baseline_of(r)
    assert structure.compare(base, base) == []
    empty = {k: [] for k in ("cycles", "forbidden_imports", "private_imports", "long_functions", "long_files")}
    new = structure.compare(base, {**empty, "format_branches_per_file": {}, "config_read_sites": 0})
    assert len(new) == 1 + 1 + 1 + 1 + 1 + 3 + 1 and all(
        "add it to tests/structure_baseline.json" in p or "raise config_read_sites" in p for p in new)
    stale = dict(base, long_files=base["long_files"] + ["tools_like/gone.py"])
    assert structure.compare(base, stale) == [
        "long file tools_like/gone.py no longer occurs -- remove it from tests/structure_baseline.json"]


def test_format_tests_counts_each_test_once(tmp_path):
    _write(tmp_path, "pyproject.toml", '[tool.setuptools]\npackages = ["convert"]\n')
    _write(tmp_path, "convert/__init__.py", "")
    _write(tmp_path, "convert/x.py", """\
        def f(q, cfg, algo):
            a = (q.quant_algo or "").startswith("W8A8_SQ")       # 1
            if q.needs_calibration and not q.is_sq_plugin:       # 2
                pass
            if cfg["quantization"]["kv_cache_quant_algo"]:       # 1 (truth test)
                pass
            b = algo.startswith("W4A16")                          # 1
            c = cfg.get("quant_algo") in ("FP8", "W8A16")         # 1
            d = {"FP8": 1}[q.quant_algo]                          # 0: a table, not a branch
            e = q.quant_algo                                      # 0: not a test
            return a, b, c, d, e
        """)
    r = structure.analyze(tmp_path)
    assert r["format_branches_per_file"] == {"convert/x.py": 6}, r["format_branches"]
