"""tools/structure.py's reading of the package: its modules, their imports, the import graph and
its cycles, forbidden imports and private names imported across modules (see tools/structure.py's
docstring for what counts)."""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = {"tests", "benchmarks", "tools", "__pycache__"}
EXCLUDED_PATHS = ("builders/triton_templates",)
FORBIDDEN_IN = ("convert", "model")  # top-level packages that may import neither of:
FORBIDDEN = ("quantize", "torch")


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


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
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
                base = dotted(node.value)
                if base is None:
                    continue
                head, _, rest = base.partition(".")
                if head not in bound:
                    continue
                target = bound[head] + ("." + rest if rest else "")
                if target in mods and target != mod.name:
                    out.append({"file": mod.rel, "line": node.lineno, "name": f"{target}.{node.attr}"})
    return sorted(out, key=lambda d: (d["file"], d["line"], d["name"]))
