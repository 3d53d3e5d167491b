"""CPU reference reader for TensorRT-LLM checkpoints: run ``config.json`` + ``rank{r}.safetensors``
with TensorRT-LLM's semantics and compare the logits with the Hugging Face model.

Every rank's shard is run separately and the ranks are combined exactly as tensor / pipeline
parallelism combines them on GPUs:

* column-parallel linears (``attention.qkv``, ``mlp.fc``, ``mlp.gate``, ``lm_head``): each tp rank
  computes its own output slice (attention runs per rank over its own heads; ``lm_head`` slices are
  all-gathered, then cropped to the unpadded ``vocab_size``);
* row-parallel linears (``attention.dense``, ``mlp.proj``): each tp rank multiplies its input
  slice, the partial results are summed (all-reduce), and the bias is added once after the sum;
* parallel embedding (``use_parallel_embedding``, ``embedding_sharding_dim`` 0): each tp rank looks
  up the rows it holds (zeros for ids outside its range), the lookups are summed; sharding dim 1:
  each rank looks up its hidden-dim slice, the slices are concatenated;
* replicated tensors (norms, row-parallel biases) are read from every rank's own copy: each tp rank
  keeps its own hidden state, as on a GPU, so copies that differ between ranks show up in the logits;
* pipeline parallel: rank = pp_rank * tp + tp_rank; each pp stage holds its layers numbered from 0
  (``torch.tensor_split`` split: the first stages get the extra layer); the embedding lives on the
  first stage, ``ln_f`` and ``lm_head`` on the last; tp rank r of stage p hands its hidden state to
  tp rank r of stage p + 1.

The reader's rooms (this module re-exports their public names and holds the command line):

* ``verify/checkpoint.py``: config.json, the mapping, every rank's tensors by module (in memory, or
  read from the rank files one decoder layer at a time);
* ``verify/kernels.py``: the ``quantization`` block and the linear / KV-cache kernel dispatch
  (``LINEAR_KERNELS`` / ``register_linear``, ``KV_CACHE_KERNELS`` / ``register_kv_cache``); the
  quantized kernels in ``verify/reference_quant.py`` and ``verify/reference_sq.py``;
* ``verify/model.py``: the transformer math (``ReferenceModel``), run layer by layer;
* ``verify/float_model.py``: the float HF model's logits, layer by layer from the safetensors;
* ``verify/compare.py``: the comparison with the HF model and its per-dtype / per-format bounds.

Command line::

    python -m verify.reference CKPT_DIR --hf HF_DIR [--text "..."]

prints one line; exit 0 when the logits match, 1 on a mismatch, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import UserError

from .checkpoint import load_checkpoint, pp_layers  # noqa: F401  (the reader's public names)
from .compare import (KV_TOLERANCE, MIN_ARGMAX_AGREEMENT, QUANT_TOLERANCE, REL_TOLERANCE,  # noqa: F401
                      UNIT_ROUNDOFF, compare_with_hf, summary_line, tolerance_for, verify)
from .kernels import (KV_CACHE_KERNELS, LINEAR_INPUT_SCALES, LINEAR_KERNELS, QuantSpec,  # noqa: F401
                      linear, register_kv_cache, register_linear)
from .model import ReferenceModel, rotary_inv_freq  # noqa: F401

__all__ = ["KV_CACHE_KERNELS", "KV_TOLERANCE", "LINEAR_INPUT_SCALES", "LINEAR_KERNELS", "MIN_ARGMAX_AGREEMENT",
           "QUANT_TOLERANCE", "QuantSpec", "REL_TOLERANCE", "ReferenceModel", "UNIT_ROUNDOFF", "compare_with_hf",
           "linear", "load_checkpoint", "main", "pp_layers", "register_kv_cache", "register_linear",
           "rotary_inv_freq", "summary_line", "tolerance_for", "verify"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m verify.reference",
        description="Run a TensorRT-LLM checkpoint on CPU with TensorRT-LLM's semantics and compare its "
                    "logits with the Hugging Face model. Exit 0: match, 1: mismatch, 2: bad input.")
    ap.add_argument("ckpt_dir", help="TensorRT-LLM checkpoint directory (config.json + rank*.safetensors)")
    ap.add_argument("--hf", required=True, metavar="HF_DIR", help="the Hugging Face model directory it came from")
    ap.add_argument("--text", help="text to run (tokenized with HF_DIR's tokenizer); default: random ids")
    ap.add_argument("--seq-len", type=int, default=32, help="length of the random ids (default 32)")
    ap.add_argument("--batch", type=int, default=2, help="batch of the random ids (default 2)")
    ap.add_argument("--eval-ppl", metavar="FILE", help="also print the perplexity of the checkpoint and of "
                    "the HF model on this text file (HF_DIR's tokenizer)")
    ap.add_argument("--ppl-seq-len", type=int, default=256, help="perplexity window length (default 256)")
    ap.add_argument("--ppl-max-tokens", type=int, default=4096, help="tokens of FILE used (default 4096)")
    args = ap.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the output to the one summary line
    except ImportError:
        pass
    try:
        if args.seq_len < 1 or args.batch < 1:
            raise UserError("--seq-len and --batch must be >= 1")
        ppl_text = None
        if args.eval_ppl is not None:
            from .perplexity import read_text_file

            ppl_text = read_text_file(args.eval_ppl)
        report, ok = verify(args.ckpt_dir, args.hf, text=args.text, random_shape=(args.batch, args.seq_len))
        print(summary_line(report, args.ckpt_dir))
        if ppl_text is not None:
            from .perplexity import checkpoint_ppl, hf_ppl, ppl_line

            kw = dict(seq_len=args.ppl_seq_len, max_tokens=args.ppl_max_tokens)
            print(ppl_line("checkpoint", checkpoint_ppl(args.ckpt_dir, ppl_text, hf_dir=args.hf, **kw)))
            print(ppl_line("Hugging Face model", hf_ppl(args.hf, ppl_text, **kw)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
