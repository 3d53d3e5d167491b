"""``build_engine``'s command line: the flags of each stage (the quantization, engine and Triton
flags come from their own rooms) and the defaults that follow other flags."""
from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_engine",
        description="Convert a Hugging Face Llama/Mistral/Qwen2/Mixtral model into a sharded (optionally "
                    "quantized) TensorRT-LLM checkpoint, engines and a Triton model repository.",
        epilog="build_engine check DIR: would TensorRT-LLM load this checkpoint? (headers only; "
               "see build_engine check --help)")
    g = p.add_argument_group("model and layout")
    g.add_argument("--from-checkpoint", type=Path, metavar="CKPT_DIR",
                   help="skip conversion: build engines (and the Triton repository) from an "
                        "existing TRT-LLM checkpoint dir, e.g. on a GPU host")
    g.add_argument("--model", help="local HF model dir, or a bundled example name: smollm2 "
                                   "(the real SmolLM2-135M-Instruct: 9 heads, 3 KV heads; tp 1, 3), "
                                   "llama (the same model with --pad-heads implied: tp 2 and 4 pad "
                                   "it exactly to 12 heads / 4 KV heads), tiny-llama, tiny-mistral, "
                                   "tiny-qwen2 (tiny random models)")
    g.add_argument("--output", required=True, type=Path, help="output directory")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    g.add_argument("--moe-tp", type=int, metavar="N",
                   help="mixture of experts (Mixtral): split every expert's intermediate "
                        "dimension N ways (TensorRT-LLM's moe_tp_size; default: tp, or tp / "
                        "--moe-ep); --moe-tp x --moe-ep must equal --tp")
    g.add_argument("--moe-ep", type=int, metavar="N",
                   help="mixture of experts: expert parallelism, each rank holding experts / N "
                        "whole experts (moe_ep_size; default: 1, or tp / --moe-tp)")
    g.add_argument("--pad-heads", action="store_true",
                   help="when --tp does not divide the attention heads, add zero heads (whole KV "
                        "groups) to the smallest count it does: exact (same logits), at the cost "
                        "of more attention compute and KV cache (printed, and in build.json); a "
                        "no-op when tp divides the heads. Engine target only")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weight dtype (auto: the model's fp16/bf16, float16 for fp32 models)")
    g.add_argument("--workers", type=int, default=1,
                   help="ranks converted in parallel (processes), and engines built in parallel "
                        "(one GPU each) unless --build-workers says otherwise (default 1)")
    g.add_argument("--ranks", metavar="A-B",
                   help="convert and/or build only ranks A to B (or one rank R) of the world, "
                        "e.g. the ranks of one node of a multi-node build; the checkpoint config "
                        "and the Triton repository still describe the whole world, and each "
                        "output appears (renamed from its .partial dir) when its last rank lands "
                        "(default: all ranks)")
    g.add_argument("--force", action="store_true", help="replace existing outputs")
    _add_safety_arguments(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_stage_arguments(p)
    _add_lora_arguments(p)
    # engine_options, not builders.engine: a --checkpoint-only run never loads the engine stage
    from builders.engine_options import add_engine_arguments
    from builders.triton import add_triton_arguments

    from quantize.formats import add_quant_arguments

    add_quant_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(build_workers=None)  # None: follow --workers (trtllm-build's --workers)
    add_triton_arguments(p)
    return p


def _add_safety_arguments(g) -> None:
    """What a run refuses by default and a flag accepts (issue 29)."""
    g.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN/Inf values, and float16 casts that overflow to "
                        "Inf (default: refused naming the tensor and the count)")
    g.add_argument("--allow-quality-loss", action="store_true",
                   help="keep a calibrated checkpoint whose quality gate shows a broken model "
                        "(top-1 agreement with the float model under 50%%, perplexity over 4x the "
                        "float model's or not finite; default: the run fails, exit 1)")


def _add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """LoRA adapters (pipeline/lora.py); absent from the Namespace unless given, so build.json
    of a run without them reads as before."""
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora", nargs="+", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                   help="PEFT LoRA adapter directories (adapter_config.json + "
                        "adapter_model.safetensors): the engine gets TensorRT-LLM's LoRA plugin "
                        "for their modules and ranks, and each is converted to OUTPUT/lora/<task "
                        "id>/ (task ids 1, 2, ... in this order); --verify checks each against "
                        "HF + PEFT")
    g.add_argument("--max-lora-rank", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="the engine's max_lora_rank (default: the largest adapter rank); an "
                        "adapter of a higher rank is refused")
    g.add_argument("--lora-plugin", choices=("float16", "bfloat16", "float32"),
                   default=argparse.SUPPRESS,
                   help="with --from-checkpoint: build the engines with TensorRT-LLM's LoRA "
                        "plugin in this dtype (the checkpoint's), as a --lora run prints it")
    g.add_argument("--lora-target-modules", nargs="+", metavar="MODULE", default=argparse.SUPPRESS,
                   help="with --from-checkpoint and --lora-plugin: TensorRT-LLM's LoRA module "
                        "names (attn_q attn_k attn_v attn_dense mlp_h_to_4h mlp_gate mlp_4h_to_h)")


def _add_stage_arguments(p: argparse.ArgumentParser) -> None:
    """Which target, where to stop, and the checks after conversion."""
    s = p.add_argument_group("stages")
    s.add_argument("--target", choices=["engine", "pytorch"], default="engine",
                   help="engine (default): TRT-LLM checkpoint + engines (TensorRT-LLM <= 1.2.x); "
                        "pytorch: modelopt unified HF checkpoint in DIR/hf_quantized + LLM-API "
                        "Triton repository, for TensorRT-LLM's PyTorch backend")
    # default SUPPRESS: a run without the flag records no key for it in build.json's options
    s.add_argument("--gpu", metavar="NAME|sm_XX", default=argparse.SUPPRESS,
                   help="the GPU the engines / the PyTorch backend will run on (h100, l4, a100, "
                        "b200, sm_89, ...; default: this host's GPU, if any): the format x GPU x "
                        "LoRA x family x target table (check/gpu.py) is checked before any work "
                        "(impossible: one line, exit 2; untested: a warning)")
    s.add_argument("--checkpoint-only", action="store_true",
                   help="stop after writing DIR/checkpoint")
    s.add_argument("--verify", action="store_true",
                   help="after conversion, run the checkpoint on CPU with TensorRT-LLM's "
                        "semantics and compare its logits with the HF model")
    s.add_argument("--eval-ppl", metavar="FILE",
                   help="after conversion, print the perplexity of the checkpoint (CPU reference "
                        "reader) and of the HF model on this text file (first 4096 tokens, "
                        "windows of 256)")


def defaults_from_other_flags(args) -> None:
    """Defaults that follow other flags: --build-workers follows --workers (trtllm-build has
    one --workers for both); --triton-target follows --target (the repository that target's
    output is served with), so build.json and triton_repo.json record what was written."""
    if args.build_workers is None:
        args.build_workers = args.workers
    if getattr(args, "triton_target", "none") is None:
        args.triton_target = getattr(args, "target", "engine")
