"""TEST HELPER: ``build_engine`` in a subprocess with a fault at one stage boundary.

    python tests/fault_runner.py ACTION AT [build_engine args...]

``AT`` names where: ``gate`` (the quality gate starts: builders.checks.quality_gate),
``triton`` (the Triton repository is written into its private stage and about to be validated:
builders.triton.repo_files.validate_repo) or ``run`` (the run's steps start, the output lock
held: pipeline.engine_target.run_engine_target). ``ACTION``: ``kill`` sends the process SIGKILL
there (nothing of Python's cleanup runs, as with the OOM killer); ``pause`` writes the file
``$FAULT_READY`` and waits until ``$FAULT_GO`` exists, then goes on. Production code has no
hook for this: the wrapped functions are replaced in this process only.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _fault(action: str):
    def hit(*_a, **_k):
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
    else:
        raise SystemExit(f"unknown stage {at}")
    from builders.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
