"""tools/structure.py's count of branches on the quantization format (see its docstring for what
counts)."""
from __future__ import annotations

import ast
import re

from structure_imports import Module, dotted

FIXED_PREDICATES = ("is_sq_plugin", "is_max_calibrated", "needs_calibration", "is_quantized",
                    "is_weight_only", "is_awq", "is_fp8")
FORMAT_KEYS = ("quant_algo", "kv_cache_quant_algo")
ALGO_PREFIXES = ("W8A8", "W4A16", "W8A16", "W4A8", "FP8", "INT8", "INT4", "NVFP4", "MIXED")
KNOWN_ALGO_VALUES = {"FP8", "INT8", "W8A16", "W4A16", "W4A16_AWQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
                     "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
                     "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN", "W4A8_AWQ",
                     "NVFP4", "FP8_BLOCK_SCALES", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16_GPTQ",
                     "MIXED_PRECISION", "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4"}


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
                            and any(dotted(d) == "property" for d in item.decorator_list)):
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
                if isinstance(e, ast.Call) and dotted(e.func) in ("tuple", "frozenset", "set") and e.args:
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
