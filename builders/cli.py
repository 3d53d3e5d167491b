"""``build_engine``: HF model → TRT-LLM checkpoint → engines → Triton model repository.

Exit status: 0 done; 1 ``--verify`` found a mismatch; 2 bad input (one line on stderr);
3 the checkpoint (and Triton repository) were written but engines were not built here;
130 interrupted (finished ranks kept for resume).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from convert import interrupt
from convert.errors import UserError

EXIT_MISMATCH, EXIT_USER, EXIT_NO_ENGINE, EXIT_INTERRUPTED = 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_engine",
        description="Convert a Hugging Face Llama/Mistral/Qwen2 model into a sharded (optionally "
                    "quantized) TensorRT-LLM checkpoint, engines and a Triton model repository.")
    g = p.add_argument_group("model and layout")
    g.add_argument("--model", help="local HF model dir, or a bundled example name "
                                   "(smollm2, llama, tiny-llama, tiny-mistral, tiny-qwen2)")
    g.add_argument("--output", required=True, type=Path, help="output directory")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weight dtype (auto: the model's fp16/bf16, float16 for fp32 models)")
    g.add_argument("--workers", type=int, default=1,
                   help="ranks converted in parallel (processes; default 1)")
    g.add_argument("--force", action="store_true", help="replace existing outputs")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("stages")
    s.add_argument("--checkpoint-only", action="store_true",
                   help="stop after writing DIR/checkpoint")
    s.add_argument("--verify", action="store_true",
                   help="after conversion, run the checkpoint on CPU with TensorRT-LLM's "
                        "semantics and compare its logits with the HF model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    interrupt.install()
    try:
        return run(args)
    except UserError as e:
        print(f"build_engine: error: {e}", file=sys.stderr)
        return e.exit_code
    except interrupt.Interrupted as e:
        print(f"build_engine: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("build_engine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args) -> int:
    from convert.convert import convert_checkpoint
    from examples.registry import resolve_model

    if not args.model:
        raise UserError("--model is required: a local HF model dir or a bundled example name")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    model_dir = resolve_model(args.model)
    out = Path(args.output)
    ckpt = out / "checkpoint"
    timings = {}
    t0 = time.perf_counter()
    config = convert_checkpoint(model_dir, ckpt, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                workers=args.workers, force=args.force,
                                progress=not args.no_progress)
    timings["checkpoint"] = time.perf_counter() - t0
    m = config["mapping"]
    print(f"checkpoint: {ckpt} ({m['world_size']} rank(s), tp {m['tp_size']}, pp {m['pp_size']}, "
          f"{config['dtype']}) in {timings['checkpoint']:.1f}s")
    if args.verify:
        from convert.reference import verify

        result = verify(ckpt, model_dir)
        print(f"verify: {result}")
        if not result.get("passed"):
            return EXIT_MISMATCH
    if args.checkpoint_only:
        return 0
    print("engines: the builder stage is not part of this version yet; the run ends after the "
          "checkpoint")
    return EXIT_NO_ENGINE
