"""The quality gate of a calibrated run: perplexity and top-1 agreement of the quantized checkpoint
(CPU reference reader, quantization simulated) against the float Hugging Face model, on tokens of
the calibration text that calibration did not see.

Users find broken quantization after deployment (NVIDIA/TensorRT-LLM #1618, #945, #2147); this
measures it before: printed on every calibrated run, and with ``--max-ppl-increase PCT`` a breach
fails the run.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .perplexity import windows

#: held-back tokens scored (windows of GATE_SEQ_LEN, each scored from its own start)
GATE_TOKENS = 1024
GATE_SEQ_LEN = 256


@torch.no_grad()
def measure(ckpt_dir, hf_model_or_dir, ids: list[int], seq_len: int = GATE_SEQ_LEN) -> dict:
    """{"ppl", "float_ppl", "increase_pct", "top1_agreement", "tokens"} over ``ids`` cut into windows."""
    from .reference import ReferenceModel, _load_hf

    ref = ReferenceModel(ckpt_dir)
    hf = _load_hf(hf_model_or_dir)
    wins = windows(ids, min(seq_len, len(ids)))
    vocab = min(ref.vocab_size, int(getattr(hf.config, "vocab_size", ref.vocab_size)))
    nll_q = nll_f = 0.0
    agree = count = 0
    for i in range(wins.shape[0]):
        batch = wins[i:i + 1]
        lq = ref.forward(batch)[..., :vocab].double()
        lf = hf(input_ids=batch).logits[..., :vocab].double()
        target = batch[:, 1:, None]
        nll_q -= float(F.log_softmax(lq[:, :-1], -1).gather(-1, target).sum())
        nll_f -= float(F.log_softmax(lf[:, :-1], -1).gather(-1, target).sum())
        agree += int((lq.argmax(-1) == lf.argmax(-1)).sum())
        count += target.numel()
    ppl, fppl = math.exp(nll_q / count), math.exp(nll_f / count)
    return {"ppl": ppl, "float_ppl": fppl, "increase_pct": 100.0 * (ppl / fppl - 1.0),
            "top1_agreement": agree / wins.numel(), "tokens": count}


def gate_line(recipe: str, r: dict, overlaps: bool, limit: float | None) -> str:
    where = "calibration text (overlapping calibration: the text is short)" if overlaps else \
        "held-back calibration text"
    verdict = ""
    if limit is not None:
        verdict = f"; limit +{limit:g}%: {'PASS' if r['increase_pct'] <= limit else 'BREACH'}"
    return (f"quality gate ({recipe}): perplexity {r['ppl']:.4f} vs float {r['float_ppl']:.4f} "
            f"({r['increase_pct']:+.2f}%), top-1 agreement {100 * r['top1_agreement']:.1f}% over "
            f"{r['tokens']} tokens of {where}{verdict}")
