"""TEST DOUBLES and helpers of the engine-stage tests (test_engine_stage.py, test_engine_worker.py,
test_engine_ranks.py, test_cli_triton.py, test_ranks_cli.py); none builds an engine.

- ``RecordingFakeTrtllm``: the whole seam (``builders.engine.Backend``), in-process; records what
  reaches TensorRT-LLM.
- ``install_double``: puts one of ``tests/trtllm_api_doubles.py``'s stand-in ``tensorrt_llm``
  packages on the workers' PYTHONPATH (the ``fake_trtllm`` / ``any_trtllm`` fixtures in
  conftest.py), so the real ``TrtllmBackend`` and its per-rank worker subprocess run for real.
- ``TwoGpus``: the real backend, told it has a supported TensorRT-LLM and two GPUs.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from builders.engine import TrtllmBackend
from trtllm_api_doubles import write_package


class RecordingFakeTrtllm:
    """TEST DOUBLE of the TensorRT-LLM seam (``builders.engine.Backend``); it compiles nothing.

    It records every ``build_rank`` call (rank, the trtllm-build args it was given, device, log
    path), counts how many calls are in flight at once, writes placeholder files named like
    TensorRT-LLM's outputs (``rank{r}.engine``; ``config.json`` from rank 0) that are NOT
    engines, and can be told to report a version, a GPU count or an import error, to fail some
    ranks (exit status 1 and a traceback-like log), or to exit 0 without writing anything;
    ``gpu(device)`` reports ``gpu_name``/``cc`` (or ``gpu_by_device[device]``) as the GPU.
    ``barrier``: a threading.Barrier every call waits on, to prove calls overlap.
    """

    def __init__(self, *, version="1.2.1", gpus=8, import_error=None, fail_ranks=(),
                 silent_ranks=(), barrier=None, gpu_name="NVIDIA H100 80GB HBM3", cc="9.0",
                 gpu_by_device=None):
        self._version, self._gpus, self._import_error = version, gpus, import_error
        self._gpu = {"name": gpu_name, "compute_capability": cc}
        self._gpu_by_device = dict(gpu_by_device or {})
        self.fail_ranks, self.silent_ranks = set(fail_ranks), set(silent_ranks)
        self.barrier = barrier
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.devices_in_flight: set = set()
        self.device_clashes = 0

    def version(self):
        return self._version

    def import_error(self):
        return self._import_error

    def gpu_count(self):
        return self._gpus

    def gpu(self, device):
        return self._gpu_by_device.get(device, self._gpu)

    def build_rank(self, rank, checkpoint_dir, out_dir, trtllm_args, log_path, *, device=None,
                   cancel=None):
        with self._lock:
            self.calls.append({"rank": rank, "args": dict(trtllm_args), "device": device,
                               "checkpoint_dir": Path(checkpoint_dir), "log": Path(log_path)})
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if device in self.devices_in_flight:
                self.device_clashes += 1
            self.devices_in_flight.add(device)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            lines = [f"fake build of rank {rank} on device {device}"]
            if rank in self.fail_ranks:
                lines += ["Traceback (most recent call last):", '  File "build.py", line 1',
                          f"RuntimeError: fake failure in rank {rank}"]
                Path(log_path).write_text("\n".join(lines) + "\n")
                return 1
            Path(log_path).write_text("\n".join(lines) + "\n")
            if rank not in self.silent_ranks:
                (Path(out_dir) / f"rank{rank}.engine").write_bytes(b"placeholder, not an engine")
                if rank == 0:
                    (Path(out_dir) / "config.json").write_text('{"placeholder": true}')
            return 0
        finally:
            with self._lock:
                self.active -= 1
                self.devices_in_flight.discard(device)


def make_checkpoint(root: Path, tp: int = 2, pp: int = 1, quant_algo=None) -> Path:
    """A hand-written TRT-LLM checkpoint dir: real config.json, placeholder rank files."""
    ckpt = root / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    config = {
        "architecture": "LlamaForCausalLM", "dtype": "float16", "logits_dtype": "float16",
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
        "hidden_size": 256, "head_size": 32, "intermediate_size": 688, "vocab_size": 1000,
        "max_position_embeddings": 2048, "hidden_act": "silu", "norm_epsilon": 1e-6,
        "position_embedding_type": "rope_gpt_neox",
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": None,
                         "exclude_modules": ["lm_head"]},
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    for r in range(tp * pp):
        (ckpt / f"rank{r}.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return ckpt


def engine_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.engine"))


def install_double(tmp_path, monkeypatch, files) -> Path:
    """Write the stand-in tensorrt_llm package ``files`` (trtllm_api_doubles.py) under
    ``tmp_path`` and put it on the workers' PYTHONPATH; return the dir its calls are recorded in."""
    site = write_package(tmp_path / "fake_site", files)
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("FAKE_TRTLLM_RECORD", str(record))
    monkeypatch.delenv("FAKE_TRTLLM_FAIL", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return record


class TwoGpus(TrtllmBackend):
    """TEST DOUBLE: the real backend, told it has a supported TensorRT-LLM and 2 GPUs of one type
    (there are none here)."""

    def version(self):
        return "1.2.1"

    def gpu_count(self):
        return 2

    def gpu(self, device):
        return {"name": "TEST DOUBLE GPU", "compute_capability": "9.0"}
