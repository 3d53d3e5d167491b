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

Tensor = torch.Tensor

#: held-back tokens scored (windows of GATE_SEQ_LEN, each scored from its own start)
GATE_TOKENS = 1024
GATE_SEQ_LEN = 256


@torch.no_grad()
def measure(ckpt_dir, hf_model_or_dir, ids: list[int], seq_len: int = GATE_SEQ_LEN) -> dict:
    """{"ppl", "float_ppl", "increase_pct", "top1_agreement", "tokens", "vocab"} over ``ids`` cut
    into windows.

    The float model, then the checkpoint, each run one decoder layer at a time over every window
    (verify/float_model.py, verify/model.py): the peak is one layer of one side plus the windows'
    activations and one window's logits, whatever the depth."""
    from .float_model import float_logits, hf_vocab_size
    from .model import ReferenceModel

    ref = ReferenceModel(ckpt_dir, lazy=True)
    wins = windows(ids, min(seq_len, len(ids)))
    batches = [wins[i:i + 1] for i in range(wins.shape[0])]
    vocab = min(ref.vocab_size, hf_vocab_size(hf_model_or_dir) or ref.vocab_size)
    nll_f, top_f = _score(batches, float_logits(hf_model_or_dir, batches), vocab)
    nll_q, top_q = _score(batches, ref.forward_windows(batches), vocab)
    agree = sum(int((q == f).sum()) for q, f in zip(top_q, top_f))
    count = sum(b[:, 1:].numel() for b in batches)
    ppl, fppl = math.exp(nll_q / count), math.exp(nll_f / count)
    return {"ppl": ppl, "float_ppl": fppl, "increase_pct": 100.0 * (ppl / fppl - 1.0),
            "top1_agreement": agree / wins.numel(), "tokens": count, "vocab": vocab}


def _score(batches: list[Tensor], logits, vocab: int) -> tuple[float, list[Tensor]]:
    """(negative log-likelihood summed over the windows, each window's top-1 ids)."""
    nll, top = 0.0, []
    for batch, lg in zip(batches, logits, strict=True):
        lg = lg[..., :vocab].double()
        nll -= float(F.log_softmax(lg[:, :-1], -1).gather(-1, batch[:, 1:, None]).sum())
        top.append(lg.argmax(-1))
    return nll, top


def gate_line(recipe: str, r: dict, overlaps: bool, limit: float | None) -> str:
    where = "calibration text (overlapping calibration: the text is short)" if overlaps else \
        "held-back calibration text"
    verdict = ""
    if limit is not None:
        verdict = f"; limit +{limit:g}%: {'PASS' if r['increase_pct'] <= limit else 'BREACH'}"
    return (f"quality gate ({recipe}): perplexity {r['ppl']:.4f} vs float {r['float_ppl']:.4f} "
            f"({r['increase_pct']:+.2f}%), top-1 agreement {100 * r['top1_agreement']:.1f}% over "
            f"{r['tokens']} tokens of {where}{verdict}")
