#!/usr/bin/env python3
"""Measure the package's structure against issue 23's "Done when" (pure stdlib: ast, pathlib).

    python tools/structure.py                      # human summary, exit 0
    python tools/structure.py --json               # everything, as JSON, exit 0
    python tools/structure.py --check BASELINE     # compare with a baseline; exit 1 on a difference
    python tools/structure.py --write-baseline [BASELINE]   # (re)write tests/structure_baseline.json

What is analysed
----------------
The top-level packages named in pyproject.toml's ``[tool.setuptools] packages`` (a new package is
picked up when it is added there), every ``*.py`` below each of them, except
``builders/triton_templates/`` (files copied into Triton repositories, not package code) and any
folder named ``tests``, ``benchmarks``, ``tools`` or ``__pycache__``. A file's module name is its
dotted path (``pkg/__init__.py`` is ``pkg``). Paths in the report are relative to the repository
root, with ``/``.

Imports
-------
Every ``import`` / ``from ... import`` statement anywhere in a file counts (module level, inside
functions, inside ``if TYPE_CHECKING:``, inside ``try``). Relative imports are resolved against
the importing module's package. ``from X import y`` is an edge to ``X.y`` when that is a project
module, else to ``X``; ``import a.b.c`` is an edge to ``a.b.c`` (or its longest prefix that is a
project module). Parent packages' ``__init__`` modules, which Python also runs, are *not* added as
edges (they would make every ``pkg/__init__`` re-export a cycle).

a. **cycles**: each strongly connected component of the project-module import graph with more than
   one module, and each module that imports itself.
b. **forbidden imports**: a module under ``convert/`` or ``model/`` whose import (at any level of
   the file) names ``quantize``/``quantize.*`` or ``torch``/``torch.*``.
c. **private imports**: ``from X import _y`` where ``X`` is a project module other than the
   importing one (``_y`` starting with one underscore; dunders are fine); ``import X._y``; and
   ``M._y`` attribute loads where ``M`` is a name (or dotted chain of names) bound in the file to a
   project module by an import.

d. Branches on the quantization format
--------------------------------------
A *format test* is one of these AST nodes (a node inside another matched node is not counted again,
so ``(q.quant_algo or "").startswith("W8A8")`` is one test):

1. an ``Attribute`` whose name is one of the spec's format predicates: every ``is_*``/``needs_*``
   property of ``QuantSpec`` (found by parsing ``quantize/formats.py``, or wherever ``class
   QuantSpec`` is, in the package) plus the fixed names ``is_sq_plugin is_max_calibrated
   needs_calibration is_quantized is_weight_only is_awq is_fp8``. Any use counts, not only in an
   ``if`` (``calibrate = spec.needs_calibration`` is a decision taken on the format, too);
2. a ``Compare`` one of whose operands *mentions a format key* (a ``Name``/``Attribute`` called
   ``quant_algo`` or ``kv_cache_quant_algo``, a subscript ``x["quant_algo"]``, a call
   ``x.get("quant_algo")``, anywhere inside the operand), or is a *format constant* (a name defined
   at module level in ``quantize/algos.py``/``formats.py`` as a QuantAlgo string such as
   ``FP8 = "FP8"``, or as a tuple/dict of them such as ``WEIGHT_ONLY_ALGOS``), or is an upper-case
   string literal that is a known QuantAlgo value (``== "FP8"``, ``== "W4A16_AWQ"``);
3. a ``.startswith(...)``/``.endswith(...)`` call whose receiver mentions a format key or whose
   argument is a string literal beginning with a QuantAlgo prefix (``W8A8``, ``W4A16``, ``W8A16``,
   ``W4A8``, ``FP8``, ``INT8``, ``INT4``, ``NVFP4``, ``MIXED``);
4. a bare format key used as a truth test: the test of ``if``/``elif``/``while``/``assert``/a
   conditional expression/a comprehension ``if``, or an operand of ``and``/``or``/``not`` inside
   such a test (``if spec.quant_algo:``);
5. each ``case`` of a ``match`` whose subject mentions a format key.

Definitions of the predicates themselves (``def is_sq_plugin``) are not uses. Dictionary lookups
keyed on the format (the table from ``quant_algo`` to recipe that issue 23 asks for) are not tests.
The issue counts "101 branch sites in 20 files, 69 outside formats.py" (the predicates and
``quant_algo ==``); this definition also counts ``in``/``!=`` comparisons, comparisons with the
format constants, ``startswith`` and truth tests, so its number is somewhat higher. The target
(<= 10) applies to files outside ``quantize/recipes/``.

e. Size
-------
A function (``def``/``async def``, methods and nested functions included; qualified name
``Class.method``, ``outer.inner``) is long when ``end_lineno - lineno + 1 > 60`` (decorators not
counted); a file is long when it has more than 400 lines.

f. config.json reads (a static approximation)
----------------------------------------------
A *read site* is (outermost only):

* a call to ``X.from_pretrained`` where ``X``'s name contains ``Config`` or ``Model``
  (``AutoConfig``, ``PretrainedConfig``, ``AutoModelForCausalLM``: loading a model parses its
  config.json), a call to ``from_json_file``, ``get_config_dict`` or ``read_hf_config``;
* a call to ``json.load``/``json.loads``/``open``/``io.open``/``.read_text``/``.read_bytes``/
  ``.open`` whose receiver or arguments contain the string literal ``"config.json"`` (exactly;
  ``generation_config.json`` etc. are other files), directly or through a variable of the same
  function assigned from an expression containing it (``p = d / "config.json"; p.read_text()``).

It cannot tell the Hugging Face model's config.json from a written TensorRT-LLM checkpoint's, does
not follow calls (one read site may run many times, or never), and misses a path built elsewhere;
``tests/test_config_reads.py`` counts the opens of the model's config.json at run time.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = REPO / "tests" / "structure_baseline.json"

RECIPES_DIR = "quantize/recipes/"

MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
MAX_FORMAT_BRANCHES = 10  # outside quantize/recipes/

CONFIG_READERS = ("from_json_file", "get_config_dict", "read_hf_config")
READ_CALLS = ("load", "loads", "open", "read_text", "read_bytes")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path
from structure_formats import format_tests, format_vocabulary  # noqa: E402
from structure_imports import (FORBIDDEN, FORBIDDEN_IN, Module, cycles, dotted,  # noqa: E402,F401
                               forbidden_imports, import_graph, load_modules, private_imports,
                               top_packages)



# ---------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------

def long_functions(mods: dict[str, Module], limit: int = MAX_FUNCTION_LINES) -> list[dict]:
    out = []
    for mod in mods.values():
        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    q = f"{prefix}.{child.name}" if prefix else child.name
                    if not isinstance(child, ast.ClassDef):
                        n = child.end_lineno - child.lineno + 1
                        if n > limit:
                            out.append({"file": mod.rel, "line": child.lineno, "qualname": q, "lines": n})
                    visit(child, q)
                else:
                    visit(child, prefix)

        visit(mod.tree, "")
    return sorted(out, key=lambda d: (d["file"], d["line"]))


def long_files(mods: dict[str, Module], limit: int = MAX_FILE_LINES) -> list[dict]:
    return sorted(({"file": m.rel, "lines": m.lines} for m in mods.values() if m.lines > limit),
                  key=lambda d: d["file"])


# ---------------------------------------------------------------------------------------------
# config.json reads (static)
# ---------------------------------------------------------------------------------------------

def _has_config_literal(e: ast.AST, tainted: set[str]) -> bool:
    for n in ast.walk(e):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and (
                n.value == "config.json" or n.value.endswith("/config.json")):
            return True
        if isinstance(n, ast.Name) and n.id in tainted:
            return True
    return False


def config_reads(mods: dict[str, Module]) -> list[dict]:
    out = []
    for mod in mods.values():
        scopes = [mod.tree] + [n for n in ast.walk(mod.tree)
                               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        hits: dict[int, tuple[ast.Call, str]] = {}
        for scope in scopes:
            # the nodes of this scope, not of nested functions
            own: list[ast.AST] = []
            todo = list(ast.iter_child_nodes(scope))
            while todo:
                n = todo.pop()
                own.append(n)
                if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                    todo.extend(ast.iter_child_nodes(n))
            tainted: set[str] = set()
            for n in own:
                if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None and _has_config_literal(n.value, set()):
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                        if isinstance(t, ast.Name):
                            tainted.add(t.id)
            for n in own:
                if not isinstance(n, ast.Call):
                    continue
                f = n.func
                fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                recv = dotted(f.value) if isinstance(f, ast.Attribute) else None
                what = None
                if fname == "from_pretrained" and recv and ("Config" in recv or "Model" in recv):
                    what = f"{recv}.from_pretrained"
                elif fname in CONFIG_READERS:
                    what = fname
                elif fname in READ_CALLS and (
                        (isinstance(f, ast.Attribute) and _has_config_literal(f.value, tainted))
                        or any(_has_config_literal(a, tainted) for a in n.args)):
                    if fname in ("load", "loads") and recv != "json":
                        continue
                    what = f"{recv}.{fname}" if recv in ("json", "io") else fname
                if what:
                    hits[id(n)] = (n, what)
        # outermost only
        inner = {id(s) for n, _ in hits.values() for s in ast.walk(n) if s is not n and id(s) in hits}
        for k, (n, what) in hits.items():
            if k not in inner:
                out.append({"file": mod.rel, "line": n.lineno, "call": what})
    return sorted(out, key=lambda d: (d["file"], d["line"]))


# ---------------------------------------------------------------------------------------------
# Report, baseline, check
# ---------------------------------------------------------------------------------------------

def analyze(root: Path = REPO, packages: list[str] | None = None) -> dict:
    mods = load_modules(root, packages)
    graph = import_graph(mods)
    predicates, constants = format_vocabulary(mods)
    branches: dict[str, list[tuple[int, str]]] = {}
    for m in mods.values():
        t = format_tests(m, predicates, constants)
        if t:
            branches[m.rel] = t
    per_file = {f: len(v) for f, v in sorted(branches.items())}
    outside = {f: n for f, n in per_file.items() if not f.startswith(RECIPES_DIR)}
    edges = sum(len(v) for v in graph.values())
    return {
        "packages": packages if packages is not None else top_packages(root),
        "modules": len(mods),
        "import_edges": edges,
        "cycles": cycles(graph),
        "forbidden_imports": forbidden_imports(mods),
        "private_imports": private_imports(mods),
        "format_predicates": sorted(predicates),
        "format_constants": sorted(constants),
        "format_branches": {f: [{"line": ln, "test": w} for ln, w in v] for f, v in sorted(branches.items())},
        "format_branches_per_file": per_file,
        "format_branches_outside_recipes": sum(outside.values()),
        "format_branch_files_outside_recipes": len(outside),
        "long_functions": long_functions(mods),
        "long_files": long_files(mods),
        "config_reads": config_reads(mods),
    }


def baseline_of(report: dict) -> dict:
    """The line-free keys that the ratchet compares (tests/structure_baseline.json)."""
    return {
        "cycles": sorted(report["cycles"]),
        "forbidden_imports": sorted(f"{d['file']}: {d['module']}" for d in report["forbidden_imports"]),
        "private_imports": sorted(f"{d['file']}: {d['name']}" for d in report["private_imports"]),
        "long_functions": sorted(f"{d['file']}:{d['qualname']}" for d in report["long_functions"]),
        "long_files": sorted(d["file"] for d in report["long_files"]),
        "format_branches_per_file": dict(sorted(report["format_branches_per_file"].items())),
        "config_read_sites": len(report["config_reads"]),
    }


HOW = ("fix it, or if it is a deliberate exception, add it to tests/structure_baseline.json with a "
       "reason (python tools/structure.py --write-baseline regenerates the lists)")


def compare(current: dict, baseline: dict) -> list[str]:
    """Problems, each a sentence; empty when ``current`` equals the baseline."""
    problems = []
    for cat in ("cycles", "forbidden_imports", "private_imports", "long_functions", "long_files"):
        def key(x):
            return json.dumps(x) if isinstance(x, list) else x
        now = Counter(key(x) for x in current[cat])
        base = Counter(key(x) for x in baseline.get(cat, []))
        for k in sorted(now - base):
            problems.append(f"new {cat[:-1].replace('_', ' ')}: {k} -- {HOW}")
        for k in sorted(base - now):
            problems.append(f"{cat[:-1].replace('_', ' ')} {k} no longer occurs -- remove it from "
                            "tests/structure_baseline.json")
    n, b = current["config_read_sites"], baseline.get("config_read_sites", 0)
    if n > b:
        problems.append(f"{n} static config.json read sites, baseline {b} -- read the model's config once "
                        "(python tools/structure.py lists them), or raise config_read_sites in "
                        "tests/structure_baseline.json with a reason")
    elif n < b:
        problems.append(f"{n} static config.json read sites, baseline {b} -- lower config_read_sites to {n} in "
                        "tests/structure_baseline.json (the baseline only shrinks)")
    for cat, what in (("format_branches_per_file", "format branches"),):
        now, base = current[cat], baseline.get(cat, {})
        for f in sorted(set(now) | set(base)):
            n, b = now.get(f, 0), base.get(f, 0)
            if n > b:
                problems.append(f"{f}: {n} {what}, baseline {b} -- {n - b} new; {HOW}")
            elif n < b:
                problems.append(f"{f}: {n} {what}, baseline {b} -- lower it to {n} in "
                                "tests/structure_baseline.json (the baseline only shrinks)")
    return problems


def write_baseline(report: dict, path: Path) -> None:
    data = {"_comment": ("Ratchet of tests/test_structure.py (issue 23's structure criteria): today's "
                         "violations, without line numbers. Regenerate with python tools/structure.py "
                         "--write-baseline; an entry added on purpose gets a reason in 'reasons'."),
            "reasons": {}}
    if path.exists():
        data["reasons"] = json.loads(path.read_text(encoding="utf-8")).get("reasons", {})
    data.update(baseline_of(report))
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def summary(r: dict) -> str:
    lines = [f"packages: {', '.join(r['packages'])} ({r['modules']} modules, {r['import_edges']} import edges)"]
    lines.append(f"a. import cycles: {len(r['cycles'])}")
    lines += [f"     {' <-> '.join(c)}" for c in r["cycles"]]
    lines.append(f"b. forbidden imports (convert/, model/ -> quantize, torch): {len(r['forbidden_imports'])}")
    lines += [f"     {d['file']}:{d['line']}  {d['module']}" for d in r["forbidden_imports"]]
    lines.append(f"c. private names imported across modules: {len(r['private_imports'])}")
    lines += [f"     {d['file']}:{d['line']}  {d['name']}" for d in r["private_imports"]]
    total = sum(r["format_branches_per_file"].values())
    lines.append(f"d. format branches: {total} in {len(r['format_branches_per_file'])} files; outside "
                 f"{RECIPES_DIR}: {r['format_branches_outside_recipes']} in "
                 f"{r['format_branch_files_outside_recipes']} files (target <= {MAX_FORMAT_BRANCHES})")
    lines += [f"     {n:4d}  {f}" for f, n in sorted(r["format_branches_per_file"].items(), key=lambda x: (-x[1], x[0]))]
    lines.append(f"e. functions over {MAX_FUNCTION_LINES} lines: {len(r['long_functions'])}")
    lines += [f"     {d['lines']:4d}  {d['file']}:{d['line']} {d['qualname']}" for d in r["long_functions"]]
    lines.append(f"   files over {MAX_FILE_LINES} lines: {len(r['long_files'])}")
    lines += [f"     {d['lines']:4d}  {d['file']}" for d in r["long_files"]]
    lines.append(f"f. config.json read sites (static approximation): {len(r['config_reads'])}")
    lines += [f"     {d['file']}:{d['line']}  {d['call']}" for d in r["config_reads"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the whole report as JSON")
    ap.add_argument("--root", type=Path, default=REPO, help="repository root (default: this one)")
    ap.add_argument("--check", type=Path, metavar="BASELINE", help="compare with a baseline; exit 1 on a difference")
    ap.add_argument("--write-baseline", nargs="?", type=Path, const=DEFAULT_BASELINE, metavar="BASELINE",
                    help=f"write the baseline (default {DEFAULT_BASELINE.relative_to(REPO)})")
    a = ap.parse_args(argv)
    report = analyze(a.root)
    if a.write_baseline:
        write_baseline(report, a.write_baseline)
        print(f"wrote {a.write_baseline}")
        return 0
    if a.check:
        problems = compare(baseline_of(report), json.loads(a.check.read_text(encoding="utf-8")))
        print("\n".join(problems) if problems else f"structure matches {a.check}")
        return 1 if problems else 0
    print(json.dumps(report, indent=1) if a.json else summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
