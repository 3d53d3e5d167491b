"""TEST HELPER: ``build_engine`` in a subprocess with a fault at one stage boundary.

    python tests/fault_runner.py ACTION AT [build_engine args...]

``AT`` names where: ``gate`` (the quality gate starts: builders.checks.quality_gate),
``triton`` (the Triton repository is written into its private stage and about to be validated:
builders.triton.repo_files.validate_repo), ``run`` (the run's steps start, the output lock
held: pipeline.engine_target.run_engine_target), ``engine-rank1`` (the engine build is about to
start rank 1, rank 0's engine built) or ``after-engines`` (the engines are in place, the Triton
repository not yet begun: pipeline.engines.write_triton). The two engine points build with the
TEST DOUBLE ``engine_fakes.TwoGpus`` (the real backend and worker subprocesses, told of two
GPUs), so the stand-in ``tensorrt_llm`` of tests/trtllm_api_doubles.py must be on the workers'
PYTHONPATH. ``ACTION``: ``kill`` sends the process SIGKILL there (nothing of Python's cleanup
runs, as with the OOM killer); ``none`` does nothing (the same run uninterrupted, for
reference); ``pause`` writes the file ``$FAULT_READY`` and waits until
``$FAULT_GO`` exists, then goes on. Production code has no hook for this: the wrapped functions
are replaced in this process only.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # the engine TEST DOUBLES


def _fault(action: str):
    def hit(*_a, **_k):
        if action == "none":  # the same run, uninterrupted (its reference)
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        Path(os.environ["FAULT_READY"]).write_text(str(os.getpid()))
        while not Path(os.environ["FAULT_GO"]).exists():
            time.sleep(0.05)

    return hit


def _wrap(module, name: str, action: str) -> None:
    real = getattr(module, name)
    fault = _fault(action)

    def wrapped(*a, **k):
        fault()
        return real(*a, **k)

    setattr(module, name, wrapped)


def _engine_fault(at: str, action: str) -> None:
    import builders.engine as E
    from engine_fakes import TwoGpus

    if at == "after-engines":
        import pipeline.engines as m
        _wrap(m, "write_triton", action)
        E.TrtllmBackend = TwoGpus
        return
    fault = _fault(action)

    class FaultAtRank1(TwoGpus):
        """TEST DOUBLE: TwoGpus, with the fault as rank 1's build is about to start."""

        def build_rank(self, rank, *a, **k):
            if rank == 1:
                fault()
            return super().build_rank(rank, *a, **k)

    E.TrtllmBackend = FaultAtRank1


def main() -> int:
    action, at, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if at == "gate":
        import builders.checks as m
        _wrap(m, "quality_gate", action)
    elif at == "triton":
        import builders.triton.repo_files as m
        _wrap(m, "validate_repo", action)
    elif at == "run":
        import pipeline.engine_target as m
        _wrap(m, "run_engine_target", action)
    elif at in ("engine-rank1", "after-engines"):
        _engine_fault(at, action)
    else:
        raise SystemExit(f"unknown stage {at}")
    from builders.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
