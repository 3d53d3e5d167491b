"""``build_engine check DIR``: would TensorRT-LLM 1.x load this checkpoint (``check/``), would its
build take it on a GPU generation (``--gpu``), and does it compute the source model
(``--numerics HF_DIR``: the CPU reference reader's logit check, as ``--verify``).

Exit status: 0 passes; 1 the checkpoint would not load (or is refused on ``--gpu``, or its logits
do not match with ``--numerics``); 2 bad input (not a checkpoint, unreadable, not modelled).
One summary line on stdout (the failure on stderr); ``--json`` prints the whole result instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError

USAGE = "build_engine check DIR [--json] [--gpu NAME|sm_XX] [--numerics HF_DIR] [--ranks A-B]"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_engine check", usage=USAGE,
        description="Check a TensorRT-LLM checkpoint against what TensorRT-LLM 1.x declares for "
                    "its model class and quantization (from the safetensors headers only): "
                    "missing, extra, mis-shaped and mis-typed tensors, config fields, in the "
                    "words TensorRT-LLM fails with. Says what DIR is when it is not a checkpoint.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--gpu", metavar="NAME|sm_XX",
                   help="also say what TensorRT-LLM 1.2's build refuses on this GPU generation "
                        "(e.g. h100, l4, a100, b200, sm_89)")
    p.add_argument("--numerics", type=Path, metavar="HF_DIR",
                   help="also run the checkpoint through the CPU reference reader and compare "
                        "its logits with this Hugging Face model (what --verify does)")
    p.add_argument("--ranks", metavar="A-B", help="check only these ranks (default: all)")
    return p


def main(argv) -> int:
    args = parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        if args.json:
            print(json.dumps({"directory": str(args.dir), "exit_code": e.exit_code,
                              "status": "bad_input", "summary": str(e)}, indent=2))
        else:
            print(f"build_engine check: error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.summary(), file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code


def run(args):
    from check import check_dir
    from check.findings import Finding
    from check.gpu import parse_gpu, refusals

    ranks = _ranks(args.ranks, args.dir)
    result = check_dir(args.dir, ranks)
    if args.gpu:
        label, sm = parse_gpu(args.gpu)
        for what, source in refusals(result.config, sm):
            result.findings.append(Finding("gpu", f"on {label} (SM {sm}): {what} ({source})"))
    if args.numerics is not None and result.exit_code == 0:
        passed, line = numerics(args.dir, args.numerics)
        result.findings.append(Finding("numerics", line, fatal=not passed))
    return result


def numerics(ckpt: Path, hf_dir: Path) -> tuple[bool, str]:
    """The reference reader's verdict (on the shipped calibration text when the model has a
    tokenizer, else on random ids), as ``--verify`` prints it."""
    from model.source import ModelSource
    from quantize.formats import DEFAULT_CALIB_DATA
    from verify.reference import summary_line, verify

    model = ModelSource.open(hf_dir)
    try:
        tokenizer = model.tokenizer("--numerics")
    except UserError:
        tokenizer = None
    if tokenizer is None:
        report, passed = verify(ckpt, model.directory)
    else:
        text = DEFAULT_CALIB_DATA.read_text(encoding="utf-8")[:2000]
        report, passed = verify(ckpt, model.directory, text=text, tokenizer=tokenizer)
    return passed, f"numerics: {summary_line(report, ckpt)}"


def _ranks(text, directory: Path):
    """--ranks A-B against the checkpoint's world (None: every rank)."""
    if text is None:
        return None
    from builders.engine_options import parse_ranks
    from check.declared import Layout
    from check.inspect import read_config

    return parse_ranks(text, Layout.of(read_config(directory / "config.json") or {}).world)
