"""launch_triton.sh and the tritonserver command line (mpirun, one process per rank), with
example requests."""
from __future__ import annotations

import re

from builders.triton.repo_files import TENSORRT_LLM

TRITONSERVER = "/opt/tritonserver/bin/tritonserver"


def launch_command(model_repository: str, world_size: int = 1, *,
                   tritonserver: str = TRITONSERVER, http_port: int = 8000,
                   grpc_port: int = 8001, metrics_port: int = 8002,
                   tensorrt_llm_model: str = TENSORRT_LLM) -> list[str]:
    """The command tensorrtllm_backend's ``scripts/launch_triton_server.py --world_size N
    --model_repo REPO`` runs: ``mpirun -n 1 tritonserver ... : -n 1 tritonserver ...``, one
    process per rank; ranks > 0 load only the tensorrt_llm model (leader mode)."""
    cmd = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        cmd += ["-n", "1", tritonserver, f"--model-repository={model_repository}"]
        if rank:
            cmd += ["--model-control-mode=explicit", f"--load-model={tensorrt_llm_model}"]
        cmd += [f"--grpc-port={grpc_port}", f"--http-port={http_port}",
                f"--metrics-port={metrics_port}", "--disable-auto-complete-config",
                f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank < world_size - 1:
            cmd.append(":")
    return cmd


def _dq(text: str) -> str:
    """Escape ``text`` for use inside double quotes in bash."""
    return re.sub(r'(["$`\\}])', r"\\\1", text)


def launch_script(repo: str, world_size: int, note: str, requests: list[str]) -> str:
    """launch_triton.sh: :func:`launch_command` with the repository and the tritonserver binary
    overridable by $TRITON_MODEL_REPO and $TRITONSERVER."""
    ranks = []
    for rank in range(world_size):
        words = ["-n", "1", '"$TRITONSERVER"', '--model-repository="$REPO"']
        if rank:
            words += ["--model-control-mode=explicit", f"--load-model={TENSORRT_LLM}"]
        words += ["--grpc-port=8001", "--http-port=8000", "--metrics-port=8002",
                  "--disable-auto-complete-config",
                  f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        ranks.append(" ".join(words))
    body = "mpirun --allow-run-as-root \\\n  " + " : \\\n  ".join(ranks)
    reqs = "\n".join(f"#   {r}" for r in requests)
    return (f"#!/usr/bin/env bash\n# Written by build_engine. {note}\n"
            f"# Same command line as tensorrtllm_backend's scripts/launch_triton_server.py "
            f"--world_size {world_size} --model_repo <this directory>.\n"
            f"# Requests, once the server is ready (curl localhost:8000/v2/health/ready):\n"
            f"{reqs}\nset -euo pipefail\n"
            f'REPO="${{TRITON_MODEL_REPO:-{_dq(repo)}}}"\n'
            f'TRITONSERVER="${{TRITONSERVER:-{TRITONSERVER}}}"\n'
            f"exec {body}\n")


ENGINE_CURL = ("curl -X POST localhost:8000/v2/models/ensemble/generate -d "
               "'{\"text_input\": \"What is machine learning?\", \"max_tokens\": 64, "
               "\"temperature\": 0.7, \"top_p\": 0.9}'")
ENGINE_CURL_STREAM = ("curl -X POST localhost:8000/v2/models/ensemble/generate_stream -d "
                      "'{\"text_input\": \"What is machine learning?\", \"max_tokens\": 64, "
                      "\"stream\": true}'")
LLMAPI_CURL = ("curl -X POST localhost:8000/v2/models/tensorrt_llm/generate -d "
               "'{\"text_input\": \"What is machine learning?\", "
               "\"sampling_param_max_tokens\": 64}'")


