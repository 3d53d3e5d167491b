"""Perplexity of a TensorRT-LLM checkpoint (through the CPU reference reader) and of a Hugging Face
model, on the same token windows of a text.

The text is tokenized once (no special tokens added beyond what the tokenizer adds by default),
cut into consecutive non-overlapping windows of ``seq_len`` tokens (the last partial window is
dropped, at most ``max_tokens`` tokens used), and every window is scored from its own start: token
``t`` is predicted from tokens ``< t`` of the same window, so each window scores ``seq_len - 1``
tokens. perplexity = exp(mean negative log-likelihood over all scored tokens), computed in float64
from float32 logits. Checkpoint and HF model see exactly the same windows.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from common.errors import UserError

Tensor = torch.Tensor


def tokenize(text: str, tokenizer) -> list[int]:
    """Token ids of ``text``; ``tokenizer`` is a HF tokenizer or a ``str -> list[int]`` callable."""
    out = tokenizer(text)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # HF tokenizers return a BatchEncoding
    return [int(i) for i in ids]


def windows(ids: list[int], seq_len: int, max_tokens: int | None = None) -> Tensor:
    """[n, seq_len] consecutive windows of ``ids`` (at most ``max_tokens`` tokens in all)."""
    if seq_len < 2:
        raise UserError(f"perplexity needs seq_len >= 2, got {seq_len}")
    n_tok = len(ids) if max_tokens is None else min(len(ids), int(max_tokens))
    n = n_tok // seq_len
    if n == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len} "
                        f"(max_tokens {max_tokens}); give a longer text or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def perplexity_of(forward: Callable[[Tensor], Tensor], wins: Tensor, batch_size: int = 4,
                  vocab: int | None = None) -> dict:
    """Perplexity of ``forward(ids [b, s]) -> logits [b, s, V]`` over ``wins``.

    ``vocab``: only the first ``vocab`` logits are used (drops a checkpoint's padded vocabulary rows).
    """
    batches = batches_of(wins, batch_size)
    with torch.no_grad():
        return perplexity_over(batches, (forward(b) for b in batches), vocab)


def batches_of(wins: Tensor, batch_size: int = 4) -> list[Tensor]:
    return [wins[i:i + batch_size] for i in range(0, wins.shape[0], batch_size)]


def perplexity_over(batches: list[Tensor], logits: Iterable[Tensor], vocab: int | None = None) -> dict:
    """Perplexity from each batch's logits (in the order of ``batches``: [b, s] windows)."""
    nll, count = 0.0, 0
    for batch, lg in zip(batches, logits, strict=True):
        lg = lg.float()
        if vocab is not None:
            lg = lg[..., :vocab]
        lp = F.log_softmax(lg[:, :-1].double(), dim=-1)
        nll -= float(lp.gather(-1, batch[:, 1:, None]).sum())
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": sum(b.shape[0] for b in batches), "seq_len": int(batches[0].shape[1])}


def _tokenizer_for(tokenizer, hf_dir):
    if tokenizer is not None:
        return tokenizer
    if hf_dir is None:
        raise UserError("perplexity needs a tokenizer (pass tokenizer= or a Hugging Face directory)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"no usable tokenizer in {hf_dir}: {' '.join(str(e).split())[:200]}") from None


def checkpoint_ppl(ckpt_dir, text: str, tokenizer=None, seq_len: int = 256, max_tokens: int | None = 4096,
                   *, hf_dir=None, reference=None, vocab: int | None = None, batch_size: int = 4) -> dict:
    """Perplexity of a TensorRT-LLM checkpoint on ``text`` through the CPU reference reader.

    ``vocab``: score only the first ``vocab`` logits (default: the tokenizer's vocabulary when it is
    smaller than the checkpoint's, e.g. modelopt's AWQ export pads the vocabulary to a multiple of 64).
    """
    from .model import ReferenceModel

    tok = _tokenizer_for(tokenizer, hf_dir)
    ref = reference or ReferenceModel(ckpt_dir, lazy=True)
    ids = tokenize(text, tok)
    wins = windows(ids, seq_len, max_tokens)
    if int(wins.max()) >= ref.vocab_size:
        raise UserError(f"the tokenizer produced id {int(wins.max())} but the checkpoint's vocab_size is "
                        f"{ref.vocab_size}; the tokenizer does not belong to this checkpoint")
    if vocab is None:
        tv = len(tok) if hasattr(tok, "__len__") else None
        vocab = tv if tv is not None and tv < ref.vocab_size else None
    batches = batches_of(wins, batch_size)
    return perplexity_over(batches, ref.forward_windows(batches), vocab)


def hf_ppl(hf_model_or_dir, text: str, tokenizer=None, seq_len: int = 256, max_tokens: int | None = 4096,
           *, batch_size: int = 4) -> dict:
    """Perplexity of a Hugging Face causal LM (a loaded model, or a directory run in float32 one
    layer at a time: verify/float_model.py)."""
    from .float_model import float_logits

    hf_dir = hf_model_or_dir if isinstance(hf_model_or_dir, (str, Path)) else None
    tok = _tokenizer_for(tokenizer, hf_dir)
    batches = batches_of(windows(tokenize(text, tok), seq_len, max_tokens), batch_size)
    return perplexity_over(batches, float_logits(hf_model_or_dir, batches))


def read_text_file(path) -> str:
    """The text of an --eval-ppl file, or one clear error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--eval-ppl file {p} does not exist or is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --eval-ppl file {p} as UTF-8 text: {e}") from None
    if not text.strip():
        raise UserError(f"--eval-ppl file {p} is empty; give a text file to measure perplexity on")
    return text


def ppl_line(name: str, r: dict) -> str:
    return (f"perplexity {name}: {r['perplexity']:.4f} over {r['tokens']} tokens "
            f"({r['windows']} windows of {r['seq_len']})")
