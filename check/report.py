"""The comparison of a checkpoint with what TensorRT-LLM declares, in TensorRT-LLM's words.

Strictness as ``tensorrt_llm/models/modeling_utils.py`` ``PretrainedModel.load`` and
``tensorrt_llm/parameter.py`` ``Parameter.value`` have it: a missing tensor raises ("Required but not
provided tensors", except ``lm_head.weight`` when a ``vocab_embedding.weight`` is there), a shape
differing from the declared one raises ("The value updated is not the same shape as the
original"), an extra tensor only warns ("Provided but not required tensors"). A dtype differing
from the declared one is a warning at load ("Parameter was initialized as X but set to Y"; int8
into an fp8 parameter is silent) that changes the parameter's dtype: ``check`` reports a float
width difference (float16 / bfloat16 / float32) as that warning, and an integer value where a
float is declared or the reverse (an int8 GEMM fed float weights, a float GEMM fed int8), and an
fp8 value where a wider float is declared or the reverse (an fp8 GEMM fed float16 weights), as a
failure.

Exit status: 0 the checkpoint would load; 1 it would not (or the build would refuse it on the
``--gpu`` named); 2 bad input (not a checkpoint, unreadable, or a model class / format this table
does not model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

from .config_checks import config_problems
from .findings import Finding, NotChecked
from .declared import Layout, NotModelled, declared_rank
from .formats import scheme_for
from .inspect import TRTLLM, kind_of, rank_header, what_it_is
from .preprocess import preprocess

EXIT_OK, EXIT_WOULD_NOT_LOAD, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class CheckResult:
    directory: Path
    kind: str
    config: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    tensors: int = 0
    seconds: float = 0.0

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.fatal]

    @property
    def exit_code(self) -> int:
        return EXIT_WOULD_NOT_LOAD if self.problems else EXIT_OK

    def describe(self) -> str:
        c, q = self.config, self.config.get("quantization") or {}
        lay = Layout.of(c)
        fmt = q.get("quant_algo") or "float"
        kv_algo = q.get("kv_cache_quant_algo")
        kv = {None: ""}.get(kv_algo, f" + {kv_algo} KV cache")
        return (f"{c.get('architecture')}, {c.get('dtype')} {fmt}{kv}, tp {lay.tp} pp {lay.pp}, "
                f"{len(self.ranks)} rank(s)")

    def summary(self) -> str:
        """One line: PASS or FAIL, what was checked, the first problem and how many more."""
        if not self.problems:
            warn = [f for f in self.findings if not f.fatal and f.kind != "numerics"]
            extra = f"; warnings: {warn[0].message} ({len(warn)} in all)" if warn else ""
            extra += "".join(f"; {f.message}" for f in self.findings if f.kind == "numerics")
            return (f"check: PASS {self.directory}: {self.describe()}: {self.tensors} tensors match "
                    f"what TensorRT-LLM 1.x declares after preprocess_weights{extra}")
        first, n = self.problems[0], len(self.problems)
        where = f"rank {first.rank}: " if first.rank is not None else ""
        more = f" (and {n - 1} more problem(s) in {len({f.rank for f in self.problems})} " \
               f"rank(s); --json lists them)" if n > 1 else ""
        return f"check: FAIL {self.directory}: {self.describe()}: {where}{first.message}{more}"

    def as_dict(self) -> dict:
        return {"directory": str(self.directory), "kind": self.kind,
                "exit_code": self.exit_code, "status": "fail" if self.problems else "pass",
                "summary": self.summary(), "architecture": self.config.get("architecture"),
                "quantization": self.config.get("quantization"), "ranks_checked": self.ranks,
                "tensors_checked": self.tensors, "seconds": round(self.seconds, 3),
                "findings": [f.as_dict() for f in self.findings]}


def check_dir(directory, ranks=None) -> CheckResult:
    """Check a directory; ``UserError`` (exit 2) when it is not a TensorRT-LLM checkpoint."""
    d = Path(directory)
    kind, config = kind_of(d)
    if kind != TRTLLM:
        raise UserError(what_it_is(kind, d))
    return check_checkpoint(d, config, ranks)


def check_checkpoint(d: Path, config: dict, ranks=None) -> CheckResult:
    t0 = time.perf_counter()
    res = CheckResult(d, TRTLLM, config)
    res.findings += config_problems(config)
    if res.problems:
        res.seconds = time.perf_counter() - t0
        return res
    world = Layout.of(config).world
    res.ranks = list(range(world)) if ranks is None else sorted(ranks)
    scheme = scheme_for((config.get("quantization") or {}).get("quant_algo"))
    by_stage: dict[int, dict] = {}
    for r in res.ranks:
        path = d / f"rank{r}.safetensors"
        if not path.is_file():
            res.findings.append(Finding("rank_file", f"{path.name} is missing: from_checkpoint "
                                        f"asserts os.path.isfile(weights_path) for rank {r} of "
                                        f"world_size {world}", rank=r))
            continue
        stage = r // Layout.of(config).tp  # every tp rank of a stage declares the same
        if stage not in by_stage:
            try:
                by_stage[stage] = declared_rank(config, r)
            except NotModelled as e:
                raise NotChecked(f"check does not model this checkpoint: {e}; not checked")
        declared = by_stage[stage]
        got, error = preprocess(rank_header(path), config, scheme)
        if error is not None:
            res.findings.append(Finding("preprocess", error, rank=r))
        res.tensors += len(got)
        res.findings += compare(declared, got, r)
    res.seconds = time.perf_counter() - t0
    return res


def compare(declared: dict, got: dict, rank: int) -> list[Finding]:
    """load()'s checks, per parameter, in its order: required names, extra names, shapes."""
    out = []
    missing = [n for n in declared if n not in got and not _shared_lm_head(n, got)]
    if missing:
        names = ", ".join(f"'{n}'" for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        out.append(Finding("missing", f"RuntimeError: Required but not provided tensors: "
                                      f"{{{names}}} ({len(missing)} of {len(declared)})",
                           rank=rank, name=missing[0]))
    extra = [n for n in got if n not in declared]
    if extra:
        names = ", ".join(f"'{n}'" for n in extra[:3]) + (", ..." if len(extra) > 3 else "")
        out.append(Finding("extra", f"Provided but not required tensors: {{{names}}} "
                                    f"({len(extra)}; a warning, ignored at load)",
                           rank=rank, name=extra[0], fatal=False))
    for name, want in declared.items():
        if name not in got:
            continue
        shape, dtype = got[name]
        if tuple(shape) not in (want.shape, want.alt) and not _scalar_fill(shape, want.shape):
            out.append(Finding("shape", f"Encounter error 'The value updated is not the same shape "
                                        f"as the original. Updated: {_tuple(shape)}, original: "
                                        f"{_tuple(want.shape)}' for parameter '{name}' "
                                        f"({want.owner})", rank=rank, name=name))
        elif dtype != want.dtype and not (want.dtype == FP8_DTYPE and dtype in INT_TYPES):
            fatal = (dtype in INT_TYPES) != (want.dtype in INT_TYPES)
            why = ("an integer / floating mismatch the quantized kernels cannot take" if fatal
                   else "a warning at load (the parameter takes the value's dtype)")
            if not fatal and FP8_DTYPE in (dtype, want.dtype):  # fp8 GEMM fed a wider float, or back
                fatal, why = True, "an fp8 / wider float mismatch the fp8 kernels cannot take"
            out.append(Finding("dtype", f"Parameter was initialized as {want.dtype} but set to "
                                        f"{dtype} for parameter '{name}' ({want.owner}): {why}",
                               rank=rank, name=name, fatal=fatal))
    return out


#: integer dtypes; Parameter.value accepts them into an fp8 parameter without a word
INT_TYPES = ("int8", "uint8", "int32", "int64")
FP8_DTYPE = "float8_e4m3fn"


def _scalar_fill(shape, declared) -> bool:
    """Parameter's value setter (``parameter.py``) reshapes a 0-dim value into a parameter whose
    every dim is 1 (modelopt's NVFP4 export writes its globals 0-dim)."""
    return tuple(shape) == () and len(declared) > 0 and max(declared) == 1


def _shared_lm_head(name: str, got: dict) -> bool:
    return name.endswith("lm_head.weight") and any(k.endswith("vocab_embedding.weight") for k in got)


def _tuple(shape) -> str:
    return str(tuple(int(x) for x in shape))
