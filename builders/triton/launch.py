"""launch_triton.sh and the tritonserver command line (mpirun, one process per rank), with
example requests."""
from __future__ import annotations

import posixpath
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


def slurm_launch_command(model_repository: str, world_size: int = 1) -> list[str]:
    """What ``launch_triton.sh slurm`` runs inside a Slurm allocation: one srun task per rank,
    each starting its rank's tritonserver (``launch_triton.sh slurm-task``)."""
    return ["srun", "--mpi=pmix", f"--ntasks={world_size}", "--kill-on-bad-exit=1", "bash",
            posixpath.join(model_repository, "launch_triton.sh"), "slurm-task"]


def _dq(text: str) -> str:
    """Escape ``text`` for use inside double quotes in bash."""
    return re.sub(r'(["$`\\}])', r"\\\1", text)


def _rank_words(rank: int, binary: str, repo: str) -> list[str]:
    words = [binary, f"--model-repository={repo}"]
    if rank:  # leader mode: ranks > 0 serve only the engine's share
        words += ["--model-control-mode=explicit", f"--load-model={TENSORRT_LLM}"]
    return words + ["--grpc-port=8001", "--http-port=8000", "--metrics-port=8002",
                    "--disable-auto-complete-config",
                    f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]


def launch_script(repo: str, world_size: int, note: str, requests: list[str], *,
                  required: tuple[str, ...] = (), rank_file: str | None = None,
                  missing_hint: str = "") -> str:
    """launch_triton.sh: :func:`launch_command` (mpirun, the default) or, with ``slurm`` as its
    argument inside a Slurm allocation, ``srun --mpi=pmix`` with one task per rank, each task
    running this script again as ``slurm-task`` to start its rank's tritonserver. The repository
    and the tritonserver binary are overridable by $TRITON_MODEL_REPO and $TRITONSERVER.
    ``required``: files (as the serving host sees them) that must exist before any server starts,
    else one line naming the first missing one and ``missing_hint``, exit 2; ``rank_file`` (with
    ``{rank}``): the file each rank needs, checked for rank 0 by the launching host and for every
    rank by its own Slurm task (other ranks' files may live on other nodes)."""
    server = ('"$TRITONSERVER"', '"$REPO"')
    mpi_ranks = " : \\\n  ".join(" ".join(["-n", "1"] + _rank_words(r, *server))
                                   for r in range(world_size))

    def check(path: str) -> str:
        return (f'[ -e "{_dq(path)}" ] || {{ echo "launch_triton.sh: {_dq(path)} is missing: '
                f'{_dq(missing_hint)}" >&2; exit 2; }}')

    task_cases = "\n".join(
        f"      {r}) " + (check(rank_file.format(rank=r)) + "\n         " if rank_file else "")
        + f"exec {' '.join(_rank_words(r, *server))} ;;" for r in range(world_size))
    outer = list(required) + ([rank_file.format(rank=0)] if rank_file else [])
    checks = "".join(check(p) + "\n" for p in outer)
    reqs = "\n".join(f"#   {r}" for r in requests)
    return (f"#!/usr/bin/env bash\n# Written by build_engine. {note}\n"
            f"# bash launch_triton.sh        mpirun, one tritonserver process per rank: the same "
            f"command line as\n#                              tensorrtllm_backend's "
            f"scripts/launch_triton_server.py --world_size {world_size}\n"
            f"# bash launch_triton.sh slurm  inside a Slurm allocation of {world_size} task(s): "
            f"srun --mpi=pmix, one task per rank\n"
            f"# Requests, once the server is ready (curl localhost:8000/v2/health/ready):\n"
            f"{reqs}\nset -euo pipefail\n"
            f'REPO="${{TRITON_MODEL_REPO:-{_dq(repo)}}}"\n'
            f'TRITONSERVER="${{TRITONSERVER:-{TRITONSERVER}}}"\n'
            f"{checks}"
            f'case "${{1:-mpirun}}" in\n'
            f"  mpirun)\n    exec mpirun --allow-run-as-root \\\n  {mpi_ranks} ;;\n"
            f"  slurm)\n    exec srun --mpi=pmix --ntasks={world_size} --kill-on-bad-exit=1 "
            f'bash "$0" slurm-task ;;\n'
            f"  slurm-task)\n"
            f'    case "${{SLURM_PROCID:?slurm-task runs under srun}}" in\n{task_cases}\n'
            f'      *) echo "launch_triton.sh: Slurm task $SLURM_PROCID is beyond world size '
            f'{world_size}: allocate {world_size} task(s)" >&2; exit 2 ;;\n    esac ;;\n'
            f'  *) echo "launch_triton.sh: unknown launcher \'$1\': use mpirun (default) or '
            f'slurm" >&2; exit 2 ;;\nesac\n')


ENGINE_CURL = ("curl -X POST localhost:8000/v2/models/ensemble/generate -d "
               "'{\"text_input\": \"What is machine learning?\", \"max_tokens\": 64, "
               "\"temperature\": 0.7, \"top_p\": 0.9}'")
ENGINE_CURL_STREAM = ("curl -X POST localhost:8000/v2/models/ensemble/generate_stream -d "
                      "'{\"text_input\": \"What is machine learning?\", \"max_tokens\": 64, "
                      "\"stream\": true}'")
LLMAPI_CURL = ("curl -X POST localhost:8000/v2/models/tensorrt_llm/generate -d "
               "'{\"text_input\": \"What is machine learning?\", "
               "\"sampling_param_max_tokens\": 64}'")


