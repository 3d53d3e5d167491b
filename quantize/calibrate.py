"""Calibration with nvidia-modelopt: the model, the tokenizer and the calibration batches.

* :func:`calibrate` loads the HF model (or takes one), cuts the calibration text into
  ``spec.calib_size`` samples of ``spec.calib_seq_len`` tokens and runs ``mtq.quantize`` with
  ``spec.modelopt_config()`` (tqdm bar per calibration pass). The model is modified in place.
* What the calibrated model's quantizers give a TensorRT-LLM checkpoint (modelopt's export math,
  unsharded, then per rank) is :mod:`quantize.modelopt_state`.

Weight-only formats (W8A16 / W4A16) need none of this: the checkpoint carries the float weights and
only ``quant_algo`` changes; trtllm-build quantizes them (see quantize/NOTES.md). With a quantized
KV cache they still need :func:`calibrate` for the k/v scales.

See quantize/NOTES.md for the per-format table (tensors, how computed, how split).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from common.errors import UserError

from model.tokenizer import load_tokenizer

from .formats import QuantSpec
from .moe_blocks import unfuse_experts

Tensor = torch.Tensor

__all__ = [
    "calibrate",
    "calibration_inputs",
    "held_back_ids",
    "make_calib_batches",
    "tokenize_text",
    "resolve_device",
]


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"calibration device {device} requested but no CUDA GPU is available; use --device cpu")
    return dev


def _load_model(hf_dir: Path, device: torch.device, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype is None:
        if device.type == "cpu":
            dtype = torch.float32  # CPU half-precision matmuls are slow or missing
        else:
            cfg = AutoConfig.from_pretrained(hf_dir)
            dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, None)
            if dtype not in (torch.float16, torch.bfloat16):
                dtype = torch.float16
    import transformers

    # transformers >= 4.56 takes dtype=, older releases torch_dtype=
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {hf_dir} for calibration: {e}") from None
    return model.to(device).eval()


def tokenize_text(text: str, tokenizer) -> list[int]:
    """Token ids of ``text`` without special tokens.

    ``tokenizer``: a Hugging Face tokenizer, or any callable ``str -> list[int]``.
    """
    if hasattr(tokenizer, "encode"):
        try:  # verbose=False: no "longer than the maximum sequence length" warning for the whole text
            ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
        except TypeError:
            ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer(text)
    ids = list(ids.tolist() if isinstance(ids, Tensor) else ids)
    if not ids:
        raise UserError("the calibration text produced no tokens; give a longer --calib-data file")
    return ids


def check_calib_tokens(spec: QuantSpec, tokenizer) -> None:
    """Refuse (one line, before any work) a calibration text shorter than one whole sample:
    ``--calib-seq-len`` tokens, less the BOS the tokenizer adds. Shorter, every sample would be
    the same few tokens (make_calib_batches repeats what there is)."""
    ids = tokenize_text(spec.read_calib_text(), tokenizer)
    need = spec.calib_seq_len - (bos_if_added(tokenizer) is not None and spec.calib_seq_len > 1)
    if len(ids) < need:
        raise UserError(f"--calib-data {spec.calib_data} holds {len(ids)} tokens but calibration "
                        f"needs at least one whole sample of --calib-seq-len {spec.calib_seq_len} "
                        f"tokens ({need} of text; {spec.calib_size * need} to use no token twice "
                        f"over --calib-size {spec.calib_size}); give a longer text or lower "
                        f"--calib-seq-len")


def bos_if_added(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself prepends one to a text (Llama: yes; GPT-2/Qwen2 style: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not hasattr(tokenizer, "encode"):
        return None
    try:
        added = tokenizer.encode("", add_special_tokens=True)
    except Exception:  # a tokenizer that cannot encode "" adds nothing we need
        return None
    return bos if bos in list(added) else None


def make_calib_batches(ids: list[int], calib_size: int, seq_len: int, batch_size: int,
                       bos_token_id: int | None = None) -> list[Tensor]:
    """Cut a token stream into ``calib_size`` samples of ``seq_len`` tokens, batched.

    Samples are consecutive, non-overlapping windows when the stream is long enough; otherwise
    ``calib_size`` evenly spaced (overlapping) windows. A stream shorter than ``seq_len`` gives
    samples of the whole stream. With ``bos_token_id`` each sample starts with BOS (then
    ``seq_len - 1`` text tokens), as the model sees text at inference.
    """
    body = seq_len - 1 if bos_token_id is not None and seq_len > 1 else seq_len
    n = len(ids)
    length = min(body, n)
    if calib_size * length <= n:
        starts = [i * length for i in range(calib_size)]
    else:
        span = n - length
        starts = [round(span * i / (calib_size - 1)) if calib_size > 1 else 0 for i in range(calib_size)]
    stream = torch.tensor(ids, dtype=torch.long)
    samples = [stream[s:s + length] for s in starts]
    if bos_token_id is not None and seq_len > 1:
        bos = torch.tensor([bos_token_id], dtype=torch.long)
        samples = [torch.cat([bos, s]) for s in samples]
    return [torch.stack(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def calibrate(hf_dir_or_model, spec: QuantSpec, calib_text: str | None = None, *,
              tokenizer=None, device: str | torch.device | None = "auto",
              dtype: torch.dtype | None = None, progress: bool = True):
    """Calibrate a model for ``spec`` with modelopt and return it (quantizers inserted, in place).

    ``hf_dir_or_model``: a Hugging Face model directory, or an already loaded ``*ForCausalLM``
    (used as is, on its own device; ``device``/``dtype`` then only place the inputs).
    ``calib_text``: the text (default: ``spec.read_calib_text()``). ``tokenizer``: HF tokenizer or
    ``str -> list[int]`` callable (default: the one in the model directory).
    ``dtype`` (loading only): default float32 on CPU, the model's fp16/bf16 on GPU.
    """
    config = spec.modelopt_config()  # the recipe's (quantize/recipes/); None: not modelopt's to calibrate
    if config is None:
        raise ValueError(f"{spec.name} needs no modelopt calibration")
    import modelopt.torch.quantization as mtq
    from tqdm.auto import tqdm

    model, batches, dev = calibration_inputs(hf_dir_or_model, spec, calib_text, tokenizer=tokenizer,
                                             device=device, dtype=dtype)
    unfuse_experts(model, spec)  # AWQ: per-expert linears, as transformers 4 (quantize/moe_blocks.py)
    passes = [0]

    def forward_loop(m):
        passes[0] += 1
        bar = tqdm(batches, desc=f"calibrating ({spec.name}, pass {passes[0]})", unit="batch",
                   disable=not progress, file=sys.stderr, leave=False)
        with torch.no_grad():
            for batch in bar:
                m(input_ids=batch.to(dev), use_cache=False)

    return mtq.quantize(model, config, forward_loop)


def calibration_inputs(hf_dir_or_model, spec: QuantSpec, calib_text: str | None = None, *,
                       tokenizer=None, device="auto", dtype=None):
    """(model in eval mode, calibration batches, device) for :func:`calibrate` and the SmoothQuant
    plugin recipe's range capture (same arguments as :func:`calibrate`)."""
    if isinstance(hf_dir_or_model, (str, Path)):
        hf_dir = Path(hf_dir_or_model)
        dev = resolve_device(device)
        if tokenizer is None:
            tokenizer = load_tokenizer(hf_dir)
        model = _load_model(hf_dir, dev, dtype)
    else:
        model = hf_dir_or_model.eval()
        dev = next(model.parameters()).device
        if tokenizer is None:
            src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if not src:
                raise UserError("calibration needs a tokenizer: pass tokenizer= or a model directory")
            tokenizer = load_tokenizer(Path(src))

    text = spec.read_calib_text() if calib_text is None else calib_text
    if not text.strip():
        raise UserError("the calibration text is empty")
    ids = tokenize_text(text, tokenizer)
    bos = bos_if_added(tokenizer)
    batches = make_calib_batches(ids, spec.calib_size, spec.calib_seq_len, spec.calib_batch_size, bos)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and max(ids) >= vocab:
        raise UserError(f"the tokenizer produced id {max(ids)} but the model's vocab_size is {vocab}; "
                        "the tokenizer does not belong to this model")
    return model, batches, dev


def held_back_ids(text: str, tokenizer, spec: QuantSpec, max_tokens: int = 1024) -> tuple[list[int], bool]:
    """Tokens of the calibration text that calibration did not see (those after its
    ``calib_size`` windows), at most ``max_tokens``; when fewer than 128 are left, the text's last
    ``max_tokens`` tokens and True (they overlap the calibration windows)."""
    ids = tokenize_text(text, tokenizer)
    bos = bos_if_added(tokenizer)
    body = spec.calib_seq_len - 1 if bos is not None and spec.calib_seq_len > 1 else spec.calib_seq_len
    used = spec.calib_size * min(body, len(ids))
    rest = ids[used:used + max_tokens]
    if used <= len(ids) and len(rest) >= 128:
        return rest, False
    return ids[-max_tokens:], True
