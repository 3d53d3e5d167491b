"""The golden matrix on another kind of CPU: numeric summaries and their comparison.

Calibration runs forward passes in float32, and the bits of a float32 forward pass differ between
CPU kinds even with ATen's and MKL's kernels pinned (matrix.PINNED_ENV): the recording machine (an
Intel Xeon with AVX-512/AMX) and an AMD EPYC give different low bits for the same run, which
change calibrated scales, the quantized values next to a rounding boundary, and the quality gate's
perplexities in build.json. Byte identity therefore holds only on the CPU kind the manifest was
recorded on (``recorded_on``); there every file must have the recorded sha256.

On another CPU kind, a calibrated file whose bytes differ is compared by its summary instead:
per safetensors tensor the dtype, the shape and four float64 moments (sum, sum of |x|, max |x|
and a position-weighted sum, which a transpose or a permutation of rows changes), and a JSON file
by its normalised content (numbers within :data:`RTOL` / :data:`ATOL`, digests of other files
skipped: those files are compared themselves). Anything else, and every file of a float case,
must still be byte-identical.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

RTOL = 0.02  # relative, on a tensor's moments and a JSON number
ATOL = 0.05  # absolute, for JSON numbers near zero (a perplexity increase in %)
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def cpu_kind() -> str:
    """The CPU's vendor and model name (what decides a float32 forward pass's low bits)."""
    import platform

    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return " / ".join(x for x in (platform.machine(), fields.get("vendor_id"),
                                  fields.get("model name")) if x)


def tensor_summary(path: Path) -> dict:
    """{tensor: [dtype, shape, sum, sum |x|, max |x|, position-weighted sum]} in float64."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            x = t.to(torch.float64).flatten() if t.numel() else torch.zeros(1, dtype=torch.float64)
            # a fixed pseudo-random weight per position (Knuth's multiplicative hash)
            w = ((torch.arange(x.numel(), dtype=torch.int64) * 2654435761) % 1000).to(torch.float64)
            out[name] = [str(t.dtype).removeprefix("torch."), list(t.shape), float(x.sum()),
                         float(x.abs().sum()), float(x.abs().max()), float((x * w / 1000).sum())]
    return out


def summary(path: Path, normalised: bytes | None) -> dict | None:
    """The file's summary (None: it must be byte-identical everywhere)."""
    if path.suffix == ".safetensors":
        return {"tensors": tensor_summary(path)}
    if path.suffix == ".json":
        return {"json": json.loads(normalised if normalised is not None else path.read_bytes())}
    return None


def _close(a: float, b: float, scale: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= RTOL * scale + 1e-12


def _tensors_differ(got: dict, want: dict) -> str | None:
    if sorted(got) != sorted(want):
        return f"tensor names {sorted(set(got) ^ set(want))[:3]} differ"
    for name, (gd, gs, *gm) in got.items():
        wd, ws, *wm = want[name]
        if (gd, gs) != (wd, ws):
            return f"{name}: {gd}{gs} vs {wd}{ws}"
        scale = max(abs(wm[1]), abs(gm[1]))  # the sums are judged against the sum of |x|
        for g, w, s in zip(gm, wm, (scale, scale, max(abs(wm[2]), abs(gm[2])), scale)):
            if not _close(g, w, s):
                return f"{name}: moments {gm} vs {wm}"
    return None


def _json_differ(got, want, where: str = "") -> str | None:
    if isinstance(want, dict) and isinstance(got, dict):
        if sorted(got) != sorted(want):
            return f"{where or '/'}: keys {sorted(set(got) ^ set(want))[:3]} differ"
        return next((d for k in sorted(want) if (d := _json_differ(got[k], want[k], f"{where}/{k}"))), None)
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return f"{where}: {len(got)} items vs {len(want)}"
        return next((d for i, (g, w) in enumerate(zip(got, want))
                     if (d := _json_differ(g, w, f"{where}/{i}"))), None)
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = abs(got - want) <= max(RTOL * max(abs(got), abs(want)), ATOL)
        return None if ok else f"{where}: {got} vs {want}"
    if isinstance(want, str) and isinstance(got, str) and _DIGEST.match(want) and _DIGEST.match(got):
        return None  # the digest of a file that is compared itself
    return None if got == want else f"{where}: {got!r} vs {want!r}"


def differs(got: dict | None, want: dict | None) -> str | None:
    """Why ``got`` is not ``want`` within the other-CPU tolerance (None: it is)."""
    if got is None or want is None:
        return "no numeric summary recorded"
    if "tensors" in want:
        return _tensors_differ(got.get("tensors", {}), want["tensors"])
    return _json_differ(got.get("json"), want.get("json"))
