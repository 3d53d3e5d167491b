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
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = REPO / "tests" / "structure_baseline.json"

EXCLUDED_DIRS = {"tests", "benchmarks", "tools", "__pycache__"}
EXCLUDED_PATHS = ("builders/triton_templates",)
FORBIDDEN_IN = ("convert", "model")  # top-level packages that may import neither of:
FORBIDDEN = ("quantize", "torch")
RECIPES_DIR = "quantize/recipes/"

MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
MAX_FORMAT_BRANCHES = 10  # outside quantize/recipes/

FIXED_PREDICATES = ("is_sq_plugin", "is_max_calibrated", "needs_calibration", "is_quantized",
                    "is_weight_only", "is_awq", "is_fp8")
FORMAT_KEYS = ("quant_algo", "kv_cache_quant_algo")
ALGO_PREFIXES = ("W8A8", "W4A16", "W8A16", "W4A8", "FP8", "INT8", "INT4", "NVFP4", "MIXED")
KNOWN_ALGO_VALUES = {"FP8", "INT8", "W8A16", "W4A16", "W4A16_AWQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
                     "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
                     "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN", "W4A8_AWQ",
                     "NVFP4", "FP8_BLOCK_SCALES", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16_GPTQ",
                     "MIXED_PRECISION", "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4"}
CONFIG_READERS = ("from_json_file", "get_config_dict", "read_hf_config")
READ_CALLS = ("load", "loads", "open", "read_text", "read_bytes")


# ---------------------------------------------------------------------------------------------
# The package's files
# ---------------------------------------------------------------------------------------------

def top_packages(root: Path) -> list[str]:
    """Top-level package names from pyproject.toml's [tool.setuptools] packages (first components)."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib

        names = tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("packages", [])
    except ModuleNotFoundError:  # Python 3.10: the one line this needs
        m = re.search(r"^\[tool\.setuptools\][^\[]*?^packages\s*=\s*\[(.*?)\]", text, re.S | re.M)
        names = re.findall(r"[\"']([\w.]+)[\"']", m.group(1)) if m else []
    seen: list[str] = []
    for n in names:
        top = n.split(".")[0]
        if top not in seen:
            seen.append(top)
    return seen


@dataclass
class Module:
    name: str  # dotted
    rel: str  # path relative to the root, with /
    is_package: bool
    tree: ast.Module
    lines: int


def load_modules(root: Path, packages: list[str] | None = None) -> dict[str, Module]:
    packages = top_packages(root) if packages is None else packages
    mods: dict[str, Module] = {}
    for pkg in packages:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            parts = path.relative_to(root).parts
            if any(p in EXCLUDED_DIRS for p in parts[:-1]) or any(
                    rel == e or rel.startswith(e + "/") for e in EXCLUDED_PATHS):
                continue
            text = path.read_text(encoding="utf-8")
            is_pkg = path.name == "__init__.py"
            dotted = ".".join(parts[:-1] if is_pkg else parts[:-1] + (path.stem,))
            mods[dotted] = Module(dotted, rel, is_pkg, ast.parse(text, filename=rel), len(text.splitlines()))
    return mods


# ---------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------

@dataclass
class Import:
    line: int
    target: str  # absolute dotted name as written/resolved (may be external)
    names: tuple[str, ...] = ()  # for `from target import names`
    is_from: bool = False


def resolve_from(mod: Module, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    pkg = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    if level > 1:
        pkg = pkg[: len(pkg) - (level - 1)]
    return ".".join(pkg + ([module] if module else []))


def imports_of(mod: Module) -> list[Import]:
    out = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            out.extend(Import(node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append(Import(node.lineno, resolve_from(mod, node.level, node.module),
                              tuple(a.name for a in node.names), True))
    return sorted(out, key=lambda i: i.line)


def project_module(name: str, mods: dict[str, Module]) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def import_graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, mod in mods.items():
        for imp in imports_of(mod):
            if imp.is_from:
                for n in imp.names:
                    full = f"{imp.target}.{n}" if imp.target else n
                    tgt = full if full in mods else project_module(imp.target, mods)
                    if tgt:
                        graph[name].add(tgt)
            else:
                tgt = project_module(imp.target, mods)
                if tgt:
                    graph[name].add(tgt)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, and self-imports (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # iterative would be safer; the graph is small (< 200 modules)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    return sorted(out)


def forbidden_imports(mods: dict[str, Module]) -> list[dict]:
    out = []
    for mod in mods.values():
        if mod.name.split(".")[0] not in FORBIDDEN_IN:
            continue
        for imp in imports_of(mod):
            names = [imp.target] if not imp.is_from or imp.target else list(imp.names)
            for t in names:
                if any(t == f or t.startswith(f + ".") for f in FORBIDDEN):
                    out.append({"file": mod.rel, "line": imp.line, "module": t})
    return out


def _private(n: str) -> bool:
    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def private_imports(mods: dict[str, Module]) -> list[dict]:
    out = []
    for mod in mods.values():
        bound: dict[str, str] = {}  # local dotted name -> project module
        for imp in imports_of(mod):
            if imp.is_from:
                src = project_module(imp.target, mods) if imp.target else None
                for n in imp.names:
                    full = f"{imp.target}.{n}"
                    if full in mods:
                        bound[n] = full
                    if src and src == imp.target and src != mod.name and _private(n):
                        out.append({"file": mod.rel, "line": imp.line, "name": f"{src}.{n}"})
            else:
                parts = imp.target.split(".")
                if project_module(imp.target, mods):
                    bound[parts[0]] = parts[0]  # `import a.b` binds a; chains resolve below
                    for i, p in enumerate(parts[1:], 1):
                        if _private(p):
                            out.append({"file": mod.rel, "line": imp.line,
                                        "name": ".".join(parts[: i + 1])})
                            break
        # `import a.b as m` binds m -> a.b
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in mods:
                        bound[a.asname] = a.name
        if not bound:
            continue
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _private(node.attr):
                base = _dotted(node.value)
                if base is None:
                    continue
                head, _, rest = base.partition(".")
                if head not in bound:
                    continue
                target = bound[head] + ("." + rest if rest else "")
                if target in mods and target != mod.name:
                    out.append({"file": mod.rel, "line": node.lineno, "name": f"{target}.{node.attr}"})
    return sorted(out, key=lambda d: (d["file"], d["line"], d["name"]))


# ---------------------------------------------------------------------------------------------
# Branches on the quantization format
# ---------------------------------------------------------------------------------------------

def _is_algo_value(v: object) -> bool:
    return isinstance(v, str) and (v in KNOWN_ALGO_VALUES or bool(
        re.fullmatch(r"[A-Z0-9_]+", v) and v.startswith(ALGO_PREFIXES)))


def format_vocabulary(mods: dict[str, Module]) -> tuple[set[str], set[str]]:
    """(predicate attribute names, format constant names) as the package defines them today."""
    predicates = set(FIXED_PREDICATES)
    constants: set[str] = set()
    for mod in mods.values():
        top = mod.name.split(".")[0]
        for node in mod.tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "QuantSpec":
                for item in node.body:
                    if (isinstance(item, ast.FunctionDef) and item.name.startswith(("is_", "needs_"))
                            and any(_dotted(d) == "property" for d in item.decorator_list)):
                        predicates.add(item.name)
        if top != "quantize" or mod.rel.rsplit("/", 1)[-1] not in ("algos.py", "formats.py"):
            continue
        for node in mod.tree.body:  # module-level constants, in order (later ones use earlier ones)
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                continue
            name, value = node.targets[0].id, node.value

            def algo_like(e: ast.AST) -> bool:
                if isinstance(e, ast.Constant):
                    return _is_algo_value(e.value)
                if isinstance(e, ast.Name):
                    return e.id in constants
                if isinstance(e, ast.Starred):
                    return algo_like(e.value)
                if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
                    return bool(e.elts) and all(algo_like(x) for x in e.elts)
                if isinstance(e, ast.Dict):
                    return bool(e.values) and all(algo_like(x) for x in e.values)
                if isinstance(e, ast.Call) and _dotted(e.func) in ("tuple", "frozenset", "set") and e.args:
                    a = e.args[0]
                    if isinstance(a, ast.Call) and isinstance(a.func, ast.Attribute) and a.func.attr == "values":
                        return algo_like(a.func.value)
                    return algo_like(a)
                return False

            if name.isupper() and algo_like(value):
                constants.add(name)
    return predicates, constants


def _format_ref(e: ast.AST) -> bool:
    """``e`` itself is a format key: quant_algo, x.quant_algo, x["quant_algo"], x.get("quant_algo")."""
    if isinstance(e, ast.Name):
        return e.id in FORMAT_KEYS
    if isinstance(e, ast.Attribute):
        return e.attr in FORMAT_KEYS
    if isinstance(e, ast.Subscript):
        s = e.slice
        return isinstance(s, ast.Constant) and s.value in FORMAT_KEYS
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr == "get" and e.args:
        a = e.args[0]
        return isinstance(a, ast.Constant) and a.value in FORMAT_KEYS
    return False


def _mentions_format(e: ast.AST) -> bool:
    return any(_format_ref(n) for n in ast.walk(e))


def format_tests(mod: Module, predicates: set[str], constants: set[str]) -> list[tuple[int, str]]:
    """(line, what) of every format test in the module (see the module docstring, d)."""
    matched: list[tuple[ast.AST, str]] = []

    def is_constant(e: ast.AST) -> bool:
        if isinstance(e, ast.Name):
            return e.id in constants
        if isinstance(e, ast.Attribute):
            return e.attr in constants
        return isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in KNOWN_ALGO_VALUES

    def truth_leaves(t: ast.AST):
        if isinstance(t, ast.BoolOp):
            for v in t.values:
                yield from truth_leaves(v)
        elif isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not):
            yield from truth_leaves(t.operand)
        else:
            yield t

    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in predicates:
            matched.append((node, node.attr))
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_mentions_format(o) or is_constant(o) for o in operands):
                matched.append((node, "compare"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            arg = node.args[0] if node.args else None
            args = arg.elts if isinstance(arg, ast.Tuple) else [arg] if arg is not None else []
            if _mentions_format(node.func.value) or any(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith(ALGO_PREFIXES)
                    for a in args):
                matched.append((node, node.func.attr))
        elif isinstance(node, ast.Match) and _mentions_format(node.subject):
            matched.extend((c.pattern, "case") for c in node.cases)
        tests = []
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = list(node.ifs)
        for t in tests:
            matched.extend((leaf, "truth") for leaf in truth_leaves(t) if _format_ref(leaf))

    # outermost only: drop a match nested inside another match
    ids = {id(n) for n, _ in matched}
    inner: set[int] = set()
    for n, _ in matched:
        for sub in ast.walk(n):
            if sub is not n and id(sub) in ids:
                inner.add(id(sub))
    seen: set[int] = set()
    out = []
    for n, what in matched:
        if id(n) in inner or id(n) in seen:
            continue
        seen.add(id(n))
        out.append((getattr(n, "lineno", 0), what))
    return sorted(out)


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
                recv = _dotted(f.value) if isinstance(f, ast.Attribute) else None
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
