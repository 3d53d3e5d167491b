"""The golden matrix: every output file of a fixed set of ``build_engine`` runs, by sha256.

Recorded before the package was restructured (issue 23) so that any later change of structure
can prove it writes the same bytes. Inputs are tiny random models (fixed seeds) with a committed
tokenizer (tests/golden/tokenizer/); each case is one ``build_engine`` command line run in this
process. What is hashed:

- every file under the run's output directory, by its path relative to that directory;
- text files (json, pbtxt, yaml, sh, txt, py) with the run's root directory replaced by
  ``<ROOT>``, so the hashes do not depend on where the run happened;
- ``build.json`` without the fields that are the host's or the clock's: ``created_utc``,
  ``versions`` and ``stage_timings_s``, the engine record's host fields, and the digests and
  sizes it lists for text files (they name the run's root directory, or, for
  ``calibration/calibration.json``, the calibration's seconds; each is hashed here itself);
- ``calibration/calibration.json`` without its ``seconds``.

Not hashed: the ownership record ``.build_engine.json`` (common.ownership): it holds only the
sizes and digests of the files hashed here, and those of the text files depend on the root.

Each case also records, beside its files, the disk figure the memory plan printed for it
(``quantize.memory.check``'s stages) and the most bytes its output directory held at any moment
(:class:`DiskPeak`); tests/test_disk_plan.py asserts the one against the other on every case of
this same run. These figures are not part of the manifest.

``python tests/golden/matrix.py --write`` records tests/golden/manifest.json (only when the
output is meant to change: say why in the commit). ``python tests/golden/matrix.py --check``
compares. tests/test_golden.py runs the check in a subprocess with the CPU kernels pinned
(``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``). That is not enough across CPU kinds (an Intel Xeon and an
AMD EPYC give calibrated files with other low bits): byte identity is asserted on the CPU kind the
manifest records (``recorded_on``), and on another kind a file whose bytes differ is compared by
its numeric summary within a tolerance (tests/golden/numeric.py).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numeric  # tests/golden/numeric.py, beside this file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MANIFEST = HERE / "manifest.json"
TOKENIZER = HERE / "tokenizer"

#: the environment tests/test_golden.py runs the matrix under (also set by hand for --write)
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

# hidden and every per-rank input a multiple of 128 (the AWQ group) at tp 1 and 2
_TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=1000, num_hidden_layers=2)
INPUTS = {
    "llama": dict(family="llama", **_TINY),
    "llama-bf16": dict(family="llama", dtype="bfloat16", seed=1, **_TINY),
    "qwen2": dict(family="qwen2", seed=2, **_TINY),
    # 9 heads / 3 KV heads (SmolLM2's attention): tp 2 needs --pad-heads
    "smol-attn": dict(family="llama", seed=3, hidden_size=576, intermediate_size=768,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=1000,
                      num_hidden_layers=2),
    "mixtral": dict(family="mixtral", seed=4, **_TINY),
    "llama-sharded": dict(family="llama", seed=5, max_shard_size="300KB", **_TINY),
}

_CK = ["--checkpoint-only"]
_CAL = ["--calib-size", "8", "--calib-seq-len", "128"]
#: name -> (input, argv); "@case/dir" in argv is replaced by that earlier case's output dir
CASES = {
    # float
    "float-tp1": ("llama", ["--tp", "1", *_CK]),
    "float-tp2-triton": ("llama", ["--tp", "2"]),
    "float-tp4": ("llama", ["--tp", "4", *_CK]),
    "float-pp2": ("llama", ["--pp", "2", *_CK]),
    "float-tp2-pp2": ("llama", ["--tp", "2", "--pp", "2", *_CK]),
    "float-fp32-out": ("llama", ["--tp", "2", "--dtype", "float32", *_CK]),
    "float-bf16-src": ("llama-bf16", ["--tp", "2", *_CK]),
    "float-sharded-src": ("llama-sharded", ["--tp", "2", *_CK]),
    "float-pad-heads": ("smol-attn", ["--tp", "2", "--pad-heads", *_CK]),
    "float-qwen2-bias": ("qwen2", ["--tp", "2", *_CK]),
    "float-workers2": ("llama", ["--tp", "2", "--workers", "2", *_CK]),
    # TensorRT-LLM's SmoothQuant plugin formats, modelopt's recipe, the alpha search
    "sq-default-triton": ("llama", ["--tp", "2", "--smoothquant", *_CAL]),
    "sq-ch-tensor": ("llama", ["--tp", "2", "--smoothquant", "0.5", "--sq-activations", "tensor",
                               *_CAL, *_CK]),
    "sq-tensor-token": ("llama", ["--tp", "2", "--smoothquant", "--sq-weights", "tensor",
                                  *_CAL, *_CK]),
    "sq-tensor-tensor": ("llama", ["--tp", "2", "--smoothquant", "--sq-weights", "tensor",
                                   "--sq-activations", "tensor", *_CAL, *_CK]),
    "sq-auto": ("llama", ["--tp", "2", "--smoothquant", "auto", *_CAL, *_CK]),
    "sq-modelopt": ("llama", ["--tp", "2", "--smoothquant", "--sq-recipe", "modelopt",
                              *_CAL, *_CK]),
    "sq-int8kv-pp2": ("llama", ["--pp", "2", "--smoothquant", "--kv-cache-dtype", "int8",
                                *_CAL, *_CK]),
    "sq-qwen2": ("qwen2", ["--tp", "2", "--smoothquant", *_CAL, *_CK]),
    "sq-pad-heads": ("smol-attn", ["--tp", "2", "--pad-heads", "--smoothquant", *_CAL, *_CK]),
    # modelopt-calibrated and max-calibrated formats
    "fp8": ("llama", ["--tp", "2", "--fp8", *_CAL, *_CK]),
    "fp8-fp8kv": ("llama", ["--tp", "2", "--fp8", "--kv-cache-dtype", "fp8", *_CAL, *_CK]),
    "fp8-qwen2": ("qwen2", ["--tp", "2", "--fp8", *_CAL, *_CK]),
    "fp8-pad-heads": ("smol-attn", ["--tp", "2", "--pad-heads", "--fp8", *_CAL, *_CK]),
    "kv-int8": ("llama", ["--tp", "2", "--kv-cache-dtype", "int8", *_CAL, *_CK]),
    "kv-fp8": ("llama", ["--tp", "2", "--kv-cache-dtype", "fp8", *_CAL, *_CK]),
    "awq128": ("llama", ["--tp", "2", "--awq", *_CAL, *_CK]),
    "awq64": ("llama", ["--tp", "2", "--awq", "--awq-block-size", "64", *_CAL, *_CK]),
    "awq-int8kv": ("llama", ["--tp", "1", "--awq", "--kv-cache-dtype", "int8", *_CAL, *_CK]),
    # weight-only: float weights, quant_algo declared (trtllm-build quantizes)
    "w8a16": ("llama", ["--tp", "2", "--int8-weight-only", *_CK]),
    "w4a16": ("llama", ["--tp", "2", "--int4-weight-only", *_CK]),
    # quantized from the weights alone (no calibration)
    "fp8-rowwise": ("llama", ["--tp", "2", "--fp8-rowwise", *_CK]),
    "fp8-rowwise-meta": ("llama", ["--fp8-rowwise", "meta", *_CK]),
    # mixture of experts
    "moe-tp2": ("mixtral", ["--tp", "2", *_CK]),
    "moe-ep2": ("mixtral", ["--tp", "2", "--moe-tp", "1", "--moe-ep", "2", *_CK]),
    "moe-tp2-ep2": ("mixtral", ["--tp", "4", "--moe-tp", "2", "--moe-ep", "2", *_CK]),
    "moe-fp8": ("mixtral", ["--tp", "2", "--fp8", *_CAL, *_CK]),
    "moe-w8a16": ("mixtral", ["--tp", "2", "--int8-weight-only", *_CK]),
    "moe-awq": ("mixtral", ["--tp", "2", "--awq", *_CAL, *_CK]),
    # the PyTorch backend's unified checkpoint (and its LLM-API Triton repository)
    "pytorch-float-triton": ("llama", ["--target", "pytorch"]),
    "pytorch-fp8": ("llama", ["--target", "pytorch", "--fp8", *_CAL, *_CK]),
    "pytorch-sq": ("llama", ["--target", "pytorch", "--smoothquant", *_CAL, *_CK]),
    "pytorch-awq": ("llama", ["--target", "pytorch", "--awq", *_CAL, *_CK]),
    "pytorch-w8a16": ("llama", ["--target", "pytorch", "--int8-weight-only", *_CK]),
    "pytorch-fp8kv": ("llama", ["--target", "pytorch", "--fp8", "--kv-cache-dtype", "fp8",
                                *_CAL, *_CK]),
    # one calibration reused for another layout
    "reuse-tp2-from-fp8": ("llama", ["--tp", "1", "--fp8", "--calibration", "@fp8/calibration",
                                     *_CAL, *_CK]),
    "reuse-sq-pp2": ("llama", ["--pp", "2", "--smoothquant", "--calibration",
                               "@sq-default-triton/calibration", *_CAL, *_CK]),
}

_TEXT_SUFFIXES = {".json", ".pbtxt", ".yaml", ".yml", ".sh", ".txt", ".py", ".md", ".jinja"}
_VOLATILE = ("created_utc", "versions", "stage_timings_s")
OWNERSHIP_RECORD = ".build_engine.json"  # common.ownership.RECORD (see the module docstring)


class DiskPeak:
    """TEST DOUBLE (a spy), a context manager: the largest total size of the files under ``root``,
    measured before each ``os.replace`` / ``os.rename`` / ``os.unlink`` / ``os.remove`` /
    ``os.rmdir`` (the only moments the tree can shrink) and at the end."""

    NAMES = ("replace", "rename", "unlink", "remove", "rmdir")

    def __init__(self, root: Path):
        self.root, self.peak, self._real = root, 0, {}

    def __enter__(self) -> "DiskPeak":
        self._real = {n: getattr(os, n) for n in self.NAMES}
        for n, real in self._real.items():
            setattr(os, n, self._measuring(real))
        return self

    def __exit__(self, *exc) -> None:
        for n, real in self._real.items():
            setattr(os, n, real)
        self.measure()

    def _measuring(self, real):
        def call(*args, **kw):
            self.measure()
            return real(*args, **kw)
        return call

    def measure(self) -> int:
        if self.root.exists():
            size = sum(p.stat().st_size for p in self.root.rglob("*")
                       if p.is_file() and not p.is_symlink())
            self.peak = max(self.peak, size)
        return self.peak


@contextlib.contextmanager
def planned_disk():
    """TEST DOUBLE (a spy) on ``quantize.memory.check``: yields the list of disk figures (bytes,
    the sum of the stages') the plan checked, one per call; the real check still runs."""
    import quantize.memory as memory

    planned, real = [], memory.check

    def spy(stages, out, device):
        planned.append(sum(s.disk for s in stages))
        return real(stages, out, device)

    memory.check = spy
    try:
        yield planned
    finally:
        memory.check = real


def make_inputs(root: Path) -> dict[str, Path]:
    """The tiny models of INPUTS under ``root``, each with the committed tokenizer."""
    import torch

    from examples.tiny import make_tiny_model

    dirs = {}
    for name, spec in INPUTS.items():
        spec = dict(spec)
        dtype = getattr(torch, spec.pop("dtype", "float32"))
        d = root / "models" / name
        make_tiny_model(d, dtype=dtype, **spec)
        for f in TOKENIZER.iterdir():
            shutil.copy(f, d / f.name)
        dirs[name] = d
    return dirs


def _normalise_build_json(data: dict) -> dict:
    for k in _VOLATILE:
        data.pop(k, None)
    for entry in data.get("outputs", {}).get("files", []):
        if Path(entry.get("path", "")).suffix in _TEXT_SUFFIXES:
            entry.pop("blake3", None), entry.pop("size", None)
    engines = data.get("engines")
    if isinstance(engines, dict):
        for k in ("hosts", "host", "gpus"):
            engines.pop(k, None)
    return data


def _normalised(f: Path, root: Path) -> bytes:
    """``f``'s bytes as hashed (see the module docstring)."""
    data = f.read_bytes()
    if f.name == "build.json":
        norm = _normalise_build_json(json.loads(data))
        data = json.dumps(norm, sort_keys=True).encode()
    elif f.name == "calibration.json":
        norm = json.loads(data)
        norm.pop("seconds", None)
        data = json.dumps(norm, sort_keys=True).encode()
    if f.suffix in _TEXT_SUFFIXES or f.name == "build.json":
        data = data.replace(str(root).encode(), b"<ROOT>")
    return data


def _files(out: Path):
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(out).as_posix()
        if rel != OWNERSHIP_RECORD:  # sizes and digests of the files hashed here (its text
            yield rel, f             # files name the root)


def digest_tree(out: Path, root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``out`` (see the module docstring)."""
    return {rel: hashlib.sha256(_normalised(f, root)).hexdigest() for rel, f in _files(out)}


def numeric_tree(out: Path, root: Path) -> dict[str, dict]:
    """{relative path: numeric summary} of the safetensors and JSON files under ``out``, what
    another CPU kind is compared with (numeric.py)."""
    sums = {rel: numeric.summary(f, _normalised(f, root)) for rel, f in _files(out)}
    return {rel: s for rel, s in sums.items() if s is not None}


def run_case(name: str, models: dict[str, Path], root: Path, outs: dict[str, Path]) -> dict:
    """Run one case in this process; return {"exit": status, "files": {path: sha256}, "disk":
    {"planned": [the plan's disk figures], "peak": the most bytes under the output}}."""
    from builders.cli import main

    model, argv = CASES[name]
    out = root / "out" / name
    argv = [str(outs[a[1:].split("/")[0]] / a.split("/", 1)[1]) if a.startswith("@") else a
            for a in argv]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
            planned_disk() as planned, DiskPeak(out) as peak:
        rc = main(["--model", str(models[model]), "--output", str(out), "--no-progress", *argv])
    outs[name] = out
    if rc not in (0, 3):
        raise RuntimeError(f"golden case {name} exited {rc}:\n{buf.getvalue()}")
    return {"exit": rc, "files": digest_tree(out, root), "numeric": numeric_tree(out, root),
            "disk": {"planned": planned, "peak": peak.peak}}


def run_matrix(names=None) -> dict:
    """Run the matrix (or the named cases, with the cases they reuse) in a temporary directory."""
    names = list(CASES) if names is None else list(names)
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        root = Path(tmp).resolve()
        old_cache = os.environ.get("BUILD_ENGINE_CACHE")
        os.environ["BUILD_ENGINE_CACHE"] = str(root / "cache")
        try:
            models = make_inputs(root)
            inputs = {n: digest_tree(d, root) for n, d in models.items()}
            outs: dict[str, Path] = {}
            cases = {n: run_case(n, models, root, outs) for n in CASES if n in names}
        finally:
            if old_cache is None:
                os.environ.pop("BUILD_ENGINE_CACHE", None)
            else:
                os.environ["BUILD_ENGINE_CACHE"] = old_cache
    return {"inputs": inputs, "cases": cases}


def compare(got: dict, want: dict, notes: list | None = None) -> list[str]:
    """Differences between two matrix results, one line each (empty: the same bytes, or on a CPU
    kind other than the manifest's ``recorded_on``, the same numbers within numeric.py's
    tolerance; ``notes`` collects the files accepted that way)."""
    diffs = []
    other_cpu = want.get("recorded_on", numeric.cpu_kind()) != numeric.cpu_kind()
    for kind in ("inputs", "cases"):
        for name in sorted(set(want[kind]) | set(got[kind])):
            w, g = want[kind].get(name), got[kind].get(name)
            if w is None or g is None:
                diffs.append(f"{kind} {name}: {'missing' if g is None else 'not recorded'}")
                continue
            if kind == "cases" and w["exit"] != g["exit"]:
                diffs.append(f"case {name}: exit {g['exit']}, recorded {w['exit']}")
            wf = w["files"] if kind == "cases" else w
            gf = g["files"] if kind == "cases" else g
            for path in sorted(set(wf) | set(gf)):
                if wf.get(path) == gf.get(path):
                    continue
                state = ("missing" if path not in gf else "new" if path not in wf
                         else "different bytes")
                if state == "different bytes" and other_cpu and kind == "cases" \
                        and path in w.get("numeric", {}):
                    why = numeric.differs(g.get("numeric", {}).get(path),
                                          w.get("numeric", {}).get(path))
                    if why is None:
                        if notes is not None:
                            notes.append(f"{name}: {path}")
                        continue
                    state += f" (beyond another CPU's tolerance: {why})"
                diffs.append(f"{kind} {name}: {path}: {state}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="record tests/golden/manifest.json")
    p.add_argument("--check", action="store_true", help="compare with tests/golden/manifest.json")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    sys.path[:0] = [str(REPO)]
    got = run_matrix()
    if args.json:
        args.json.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if args.write:  # the bytes only: the disk figures are checked, not recorded
        cases = {n: {k: c[k] for k in ("exit", "files", "numeric")} for n, c in got["cases"].items()}
        manifest = {**got, "cases": cases, "recorded_on": numeric.cpu_kind()}
        MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got['cases'])} cases in {MANIFEST}")
    if args.check:
        want, notes = json.loads(MANIFEST.read_text()), []
        diffs = compare(got, want, notes)
        if notes:
            print(f"on {numeric.cpu_kind()}, not the recording CPU ({want.get('recorded_on')}): "
                  f"{len(notes)} calibrated files equal within numeric.py's tolerance, not "
                  "byte for byte:\n  " + "\n  ".join(notes))
        print("\n".join(diffs) if diffs else f"same bytes: {len(got['cases'])} cases")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
