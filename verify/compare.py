"""The reference reader against the float Hugging Face model: logits of a checkpoint and of the
model on the same ids, their error statistics, and a verdict from per-dtype / per-format bounds.

Both sides run one decoder layer at a time (verify/model.py, verify/float_model.py), so a check of
a model of any depth needs one layer's memory on each side, one side after the other.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from common.errors import UserError
from quantize.recipes import find_recipe

from .float_model import float_logits, hf_vocab_size
from .model import ReferenceModel

Tensor = torch.Tensor

# Pass thresholds on rel = ||ref - hf|| / ||hf|| over all logits, by the checkpoint's dtype.
# fp32: both sides compute the same float32 arithmetic in a different order; observed ~1e-7,
#   1e-5 leaves headroom for longer sums (real models) while any wrong tensor gives rel >= 1e-2.
# fp16 / bf16: the checkpoint's weights are the HF fp32 weights rounded once to the storage dtype,
#   a relative perturbation of at most the unit roundoff u (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3),
#   uniformly distributed per element. The reference computes in fp32, so the only error is those
#   rounded weights propagated to the logits, which, for a few dozen independent rounded matrices
#   in a stable network, stays within a small multiple of u. We allow 16u (fp16 7.8e-3, bf16 6.3e-2):
#   tiny random models exported by modelopt measure 1.3-2u; a layout error (swapped fc/gate, two q
#   heads swapped, a tp rank's replicated norm off) gives rel 6e-2..4e-1, far above it.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
REL_TOLERANCE = {"float32": 1e-5, "float16": 16 * 2.0 ** -11, "bfloat16": 16 * 2.0 ** -8}
# Argmax may legitimately flip where two logits nearly tie, more often the coarser the rounding, so a
# fraction of positions is allowed to disagree (fp32: only an exact numerical tie would).
MIN_ARGMAX_AGREEMENT = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.8}


# Quantized checkpoints compared with the FLOAT Hugging Face model: the difference is the format's
# quantization error, which depends on the model (outliers, depth), so these thresholds are sanity
# bounds that catch layout/scale errors (a wrong or misplaced tensor gives rel err ~0.6..1+ and argmax
# agreement near chance), not quality targets: quality is measured by perplexity (BENCHMARKS.md
# "Quality", ``python -m verify.reference --eval-ppl``). Measured rel err vs the float model on tiny
# random models (the hardest case: no structure, 2 layers of random weights; calibration 4 x 64):
#   W8A8_SQ_PER_CHANNEL 0.19   FP8 0.11   W4A16_AWQ (group 128) 0.36   KV INT8 1.4e-2   KV FP8 4e-2
#   W8A16 1.8e-2; W4A16 (per channel) 0.32 with 47 % argmax agreement (tiny, hidden 128)
# A format's bound is (max rel err, min argmax agreement); with a KV format too, the rel errors add
# and the lower agreement applies.
QUANT_TOLERANCE = {
    "W8A16": (0.05, 0.85),
    "W4A16": (0.5, 0.3),
    "W8A8_SQ_PER_CHANNEL": (0.4, 0.5),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (0.3, 0.6),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": (0.3, 0.6),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": (0.4, 0.5),
    "W8A8_SQ_PER_TENSOR_PLUGIN": (0.4, 0.5),
    "FP8": (0.3, 0.6),
    "W4A16_AWQ": (0.6, 0.3),
    "FP8_PER_CHANNEL_PER_TOKEN": (0.3, 0.6),
    "NVFP4": (0.6, 0.3),
    "W4A8_AWQ": (0.6, 0.3),
}
KV_TOLERANCE = {"INT8": (0.05, 0.85), "FP8": (0.1, 0.8), "NVFP4": (0.2, 0.6)}


def tolerance_for(config: dict) -> tuple[float, float]:
    """(max relative error, min argmax agreement) vs the float HF model for a checkpoint's config."""
    dtype = str(config.get("dtype", "float32"))
    if dtype not in REL_TOLERANCE:
        raise UserError(f"checkpoint dtype {dtype!r} has no tolerance (known: {', '.join(REL_TOLERANCE)})")
    rel, agree = REL_TOLERANCE[dtype], MIN_ARGMAX_AGREEMENT[dtype]
    q = config.get("quantization") or {}
    for table, key in ((QUANT_TOLERANCE, q.get("quant_algo")), (KV_TOLERANCE, q.get("kv_cache_quant_algo"))):
        if key is not None:
            if key not in table:
                raise UserError(f"{key} has no verify tolerance (known: {', '.join(table)})")
            rel, agree = rel + table[key][0], min(agree, table[key][1])
    return rel, agree


def _default_ids(vocab: int, batch=2, seq=32, seed=0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def compare_with_hf(ckpt_dir, hf_model_or_dir, input_ids=None, text=None, tokenizer=None,
                    reference: ReferenceModel | None = None, random_shape=(2, 32)) -> dict:
    """Run the checkpoint and the HF model on the same ids; return error statistics over the logits.

    ``hf_model_or_dir``: a loaded HF causal LM (used as given) or a directory (run in float32 one
    layer at a time, verify/float_model.py).
    Inputs: ``input_ids`` [batch, seq], or ``text`` (tokenized with ``tokenizer``, or the tokenizer in
    the HF directory), or else fixed pseudo-random ids of ``random_shape`` (batch, seq; seed 0).
    ``reference``: an already built ReferenceModel of ``ckpt_dir`` (saves reading it again).
    """
    ref = reference or ReferenceModel(ckpt_dir, lazy=True)
    hf_vocab = hf_vocab_size(hf_model_or_dir)
    vocab = ref.vocab_size
    if hf_vocab is not None and int(hf_vocab) != ref.vocab_size:
        # modelopt's AWQ export pads the vocabulary to a multiple of 64 and writes the padded size
        # (its recipe's vocab_padding): compare the real tokens' logits (the padded rows are zero).
        recipe = find_recipe(ref.qcfg.quant_algo)
        padding = recipe.vocab_padding if recipe is not None else 0
        if not (int(hf_vocab) < ref.vocab_size <= int(hf_vocab) + padding):
            raise UserError(f"vocab_size differs: checkpoint {ref.vocab_size}, Hugging Face model {hf_vocab}")
        vocab = int(hf_vocab)
    if input_ids is None and text is not None:
        if tokenizer is None:
            if not isinstance(hf_model_or_dir, (str, Path)):
                raise UserError("text given without a tokenizer (pass tokenizer= or a Hugging Face directory)")
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(hf_model_or_dir)
            except (OSError, ValueError) as e:
                raise UserError(f"no usable tokenizer in {hf_model_or_dir}: {' '.join(str(e).split())[:200]}") from None
        input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if input_ids.numel() == 0:
            raise UserError("the text tokenizes to no tokens")
    if input_ids is None:
        input_ids = _default_ids(vocab, *random_shape)
    input_ids = torch.as_tensor(input_ids).long()
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)

    got = next(ref.forward_windows([input_ids]))[..., :vocab]
    want = next(float_logits(hf_model_or_dir, [input_ids]))[..., :vocab]
    diff = got.double() - want.double()
    rel = float(diff.norm() / want.double().norm().clamp_min(1e-30))
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return {
        "max_abs_err": float(diff.abs().max()),
        "rel_err": rel,
        "argmax_agreement": agree,
        "tokens": int(input_ids.numel()),
        "shape": list(got.shape),
        "dtype": str(ref.config.get("dtype", "float32")),
        "quant": "+".join(f"{k} {v}" for k, v in (("", ref.qcfg.quant_algo), ("kv", ref.qcfg.kv_cache_quant_algo))
                          if v).strip() or None,
        "tp": ref.tp,
        "pp": ref.pp,
    }


def verify(ckpt_dir, hf_dir, input_ids=None, text=None, tokenizer=None,
           random_shape=(2, 32)) -> tuple[dict, bool]:
    """``compare_with_hf`` plus a verdict from the checkpoint dtype's tolerance (see REL_TOLERANCE).

    Returns (report, passed); the report also holds the tolerances and ``passed``.
    """
    ref = ReferenceModel(ckpt_dir, lazy=True)
    report = compare_with_hf(ckpt_dir, hf_dir, input_ids=input_ids, text=text, tokenizer=tokenizer,
                             reference=ref, random_shape=random_shape)
    rel_tol, min_agree = tolerance_for(ref.config)
    ok = (math.isfinite(report["rel_err"]) and report["rel_err"] < rel_tol
          and report["argmax_agreement"] >= min_agree)
    report.update(rel_tolerance=rel_tol, min_argmax_agreement=min_agree, passed=ok)
    return report, ok


def summary_line(report: dict, ckpt_dir) -> str:
    quant = f" ({report['quant']} vs the float model)" if report.get("quant") else ""
    return (f"{'PASS' if report['passed'] else 'MISMATCH'} {ckpt_dir}: dtype {report['dtype']}{quant} "
            f"tp {report['tp']} pp {report['pp']}, {report['tokens']} tokens: "
            f"rel err {report['rel_err']:.3e} (tolerance {report['rel_tolerance']:.1e}), "
            f"max abs err {report['max_abs_err']:.3e}, "
            f"argmax agreement {100 * report['argmax_agreement']:.1f}% (min {100 * report['min_argmax_agreement']:.0f}%)")
