"""``build_engine``: HF model → TRT-LLM checkpoint → engines → Triton model repository.

Exit status: 0 done; 1 ``--verify`` found a mismatch; 2 bad input, or a file the disk would not
read or write (full disk, I/O error: one line on stderr naming the file);
3 the checkpoint (and Triton repository) were written but engines were not built here
(no TensorRT-LLM <= 1.2 or no GPU; the message gives the command to finish on a GPU host);
4 an engine build failed (its rank's log is shown); 130 interrupted (finished ranks kept for resume).
A checkpoint that TensorRT-LLM would not load (``check/``) stops the run with exit 1 before any
engine. ``build_engine check DIR`` (builders/check_cli.py) checks a checkpoint on its own.
"""
from __future__ import annotations

import sys

from common import interrupt
from common.errors import IO_ERRNOS, UserError, io_error

EXIT_MISMATCH, EXIT_USER, EXIT_NO_ENGINE, EXIT_INTERRUPTED = 1, 2, 3, 130


def main(argv=None) -> int:
    from builders.cli_args import build_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:  # `build_engine check DIR`: a subcommand before the build's flags
        from builders.check_cli import main as check_main

        return check_main(argv[1:])
    if argv[:1] == ["lora"]:  # `build_engine lora OUTPUT --lora DIR ...` (builders/lora_cli.py)
        from builders.lora_cli import main as lora_main

        return lora_main(argv[1:])
    args = build_parser().parse_args(argv)
    interrupt.install()
    try:
        return run(args)
    except UserError as e:
        print(f"build_engine: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno not in IO_ERRNOS:
            raise  # not the disk's or the file system's: a bug, with its traceback
        print(f"build_engine: error: {io_error(e)}", file=sys.stderr)
        return EXIT_USER
    except interrupt.Interrupted as e:
        print(f"build_engine: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("build_engine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args) -> int:
    """parse -> plan (every refusal) -> lock OUTPUT -> run the target's steps -> build.json; the
    exit status."""
    from builders.manifest import write_manifest
    from common.outlock import OutputLock
    from common.staged import StagedOutput
    from pipeline.engine_target import run_engine_target
    from pipeline.plan import make_plan
    from pipeline.pytorch_target import run_pytorch_target

    plan = make_plan(args)
    # --ranks runs of one world write side by side (shared); any other run holds OUTPUT alone
    with OutputLock(plan.out, shared=plan.ranks_text is not None) as lock:
        if not lock.shared:
            StagedOutput.sweep(plan.out)  # what killed runs left: no one else is writing
        result = (run_pytorch_target if plan.target == "pytorch" else run_engine_target)(plan)
        if result.manifest:
            engines = {} if result.engines is None else {"engines": result.engines}
            write_manifest(plan.out, inputs=result.inputs,
                           options={**plan.options, **result.extra},
                           stage_timings=result.timings, layout=result.layout,
                           digests=result.digests, only=result.outputs, **engines)
    return result.exit_code
