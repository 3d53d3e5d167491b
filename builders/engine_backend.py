"""The seam between the engine stage and TensorRT-LLM: what the stage asks of it
(:class:`Backend`), the real implementation (:class:`TrtllmBackend`, which runs one
``python -m builders.engine_worker`` subprocess per rank and never imports tensorrt_llm itself),
and the availability checks (installed? supported release? GPU? importable?).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from common.versions import dist_version

# The releases whose engine-building API was read (README, "TensorRT-LLM calls"): the 1.0/1.1
# sources (dataclass BuildConfig.from_dict) and 1.2 (pydantic BuildConfig, NVIDIA/TensorRT-LLM
# PR #8330). 1.3 removed the TensorRT engine backend.
MIN_VERSION = (1, 0)
MAX_VERSION_EXCLUSIVE = (1, 3)
REQUIREMENT = "tensorrt_llm>=1.0,<1.3"
INSTALL_COMMAND = 'pip install "tensorrt_llm>=1.0,<1.3" --extra-index-url https://pypi.nvidia.com'
CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKER_MODULE = "builders.engine_worker"


@runtime_checkable
class Backend(Protocol):
    """Everything this stage asks of TensorRT-LLM."""

    def version(self) -> str | None:
        """The installed TensorRT-LLM version, or None when it is not installed."""

    def import_error(self) -> str | None:
        """None when ``import tensorrt_llm`` works, else the error, one line."""

    def gpu_count(self) -> int:
        """Number of NVIDIA GPUs visible to a build."""

    def gpu(self, device: str) -> dict | None:
        """``{"name": ..., "compute_capability": "9.0"}`` of GPU ``device`` (a
        CUDA_VISIBLE_DEVICES entry), or None when it cannot be told."""

    def build_rank(self, rank: int, checkpoint_dir: Path, out_dir: Path, trtllm_args: dict,
                   log_path: Path, *, device: str | None = None,
                   cancel: threading.Event | None = None) -> int:
        """Build ``out_dir/rank{rank}.engine`` (and ``out_dir/config.json`` for rank 0) on GPU
        ``device``, writing all output to ``log_path``; return the exit status (0 = success).
        Stop early when ``cancel`` is set."""


def visible_device_ids(n: int) -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        ids = [x.strip() for x in env.split(",") if x.strip()]
        return ids[:n]
    return [str(i) for i in range(n)]


class TrtllmBackend:
    """The real TensorRT-LLM, used through worker subprocesses.

    Nothing here imports tensorrt_llm: the version comes from the installed distribution's
    metadata, importability from a subprocess probe, GPUs from torch or nvidia-smi.
    """

    PROBE_TIMEOUT_S = 600

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self._probe: dict | None = None

    # availability
    def _run_probe(self) -> dict:
        if self._probe is None:
            code = ("import json, tensorrt_llm; "
                    "print('TRTLLM_PROBE ' + json.dumps({'version': tensorrt_llm.__version__}))")
            try:
                p = subprocess.run([self.python, "-c", code], capture_output=True, text=True,
                                   timeout=self.PROBE_TIMEOUT_S, env=self._env(None))
            except subprocess.TimeoutExpired:
                self._probe = {"error": f"import tensorrt_llm took over {self.PROBE_TIMEOUT_S}s"}
                return self._probe
            line = next((x for x in p.stdout.splitlines() if x.startswith("TRTLLM_PROBE ")), None)
            if p.returncode == 0 and line:
                self._probe = json.loads(line.split(" ", 1)[1])
            else:
                err = [x for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
                self._probe = {"error": err[-1].strip() if err else f"exit status {p.returncode}"}
        return self._probe

    def version(self) -> str | None:
        v = dist_version("tensorrt_llm", "tensorrt-llm")
        if v is not None:
            return v
        try:
            spec = importlib.util.find_spec("tensorrt_llm")
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        return self._run_probe().get("version", "unknown")  # a source tree on the path

    def import_error(self) -> str | None:
        return self._run_probe().get("error")

    def gpu_count(self) -> int:
        try:
            import torch

            n = torch.cuda.device_count()
            if n:
                return n
        except Exception:  # noqa: BLE001 - a broken torch just means: ask nvidia-smi
            pass
        smi = shutil.which("nvidia-smi")
        if not smi:
            return 0
        try:
            p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return 0
        n = sum(1 for line in p.stdout.splitlines() if line.startswith("GPU "))
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            n = min(n, len([x for x in env.split(",") if x.strip() and x.strip() != "-1"]))
        return n

    def gpu(self, device: str) -> dict | None:
        """From nvidia-smi, whose indices are what CUDA_VISIBLE_DEVICES names (with the usual
        CUDA_DEVICE_ORDER=PCI_BUS_ID; UUIDs match as well); None when it cannot tell."""
        smi = shutil.which("nvidia-smi")
        if not smi:
            return None
        try:
            p = subprocess.run([smi, "--query-gpu=index,uuid,name,compute_cap",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        for line in p.stdout.splitlines() if p.returncode == 0 else []:
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 4 and str(device).strip() in (parts[0], parts[1]):
                return {"name": parts[2], "compute_capability": parts[3]}
        return None

    # building
    def _env(self, device: str | None) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        return env

    def worker_command(self, rank: int, checkpoint_dir: Path, out_dir: Path,
                       trtllm_args: dict) -> list[str]:
        return [self.python, "-m", WORKER_MODULE, "--rank", str(rank),
                "--checkpoint-dir", str(Path(checkpoint_dir).resolve()),
                "--output-dir", str(Path(out_dir).resolve()),
                "--trtllm-args", json.dumps(trtllm_args, sort_keys=True)]

    def build_rank(self, rank, checkpoint_dir, out_dir, trtllm_args, log_path, *, device=None,
                   cancel=None) -> int:
        cmd = self.worker_command(rank, checkpoint_dir, out_dir, trtllm_args)
        log_path = Path(log_path)
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"# rank {rank} on CUDA_VISIBLE_DEVICES={device}\n# {shlex.join(cmd)}\n")
            log.flush()
            # cwd: the log dir, so nothing TensorRT-LLM drops into the cwd lands among engines
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self._env(device),
                                    cwd=str(log_path.parent))
            try:
                while True:
                    try:
                        return proc.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        if cancel is not None and cancel.is_set():
                            _stop(proc)
                            return proc.returncode
            except BaseException:
                _stop(proc)
                raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- availability ------------------------------------------------------------------------------

def parse_version(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"\s*v?(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_in_range(text: str | None) -> bool:
    v = parse_version(text)
    return v is not None and MIN_VERSION <= v < MAX_VERSION_EXCLUSIVE


@dataclass
class Availability:
    ok: bool
    version: str | None
    gpus: int
    reason: str | None  # a clause: "because ..." (None when ok)


def check_trtllm(backend: Backend) -> Availability:
    """Installed? In the supported window? A GPU visible? Importable? — cheapest first."""
    version = backend.version()
    if version is None:
        return Availability(False, None, 0, "TensorRT-LLM is not installed here (install it with "
                            f"{INSTALL_COMMAND}, or use the {CONTAINER} container)")
    parsed = parse_version(version)
    if parsed is not None and not version_in_range(version):
        why = ("1.3 removed the TensorRT engine backend" if parsed >= MAX_VERSION_EXCLUSIVE
               else "the engine worker is checked against the 1.0 to 1.2 Python API only")
        return Availability(False, version, 0, f"TensorRT-LLM {version} is installed but engines "
                            f"need {REQUIREMENT} ({why}): install one with {INSTALL_COMMAND} or "
                            f"use the {CONTAINER} container")
    gpus = backend.gpu_count()
    if gpus < 1:
        return Availability(False, version, 0, "no NVIDIA GPU is visible here (torch.cuda and "
                            "nvidia-smi found none) and TensorRT engines are compiled on the GPU "
                            "they will run on")
    err = backend.import_error()
    if err:
        return Availability(False, version, gpus, f"import tensorrt_llm {version} fails ({err})")
    if parsed is None:
        return Availability(False, version, gpus, f"the installed TensorRT-LLM reports version "
                            f"{version!r}, which is not a release in {REQUIREMENT}")
    return Availability(True, version, gpus, None)
