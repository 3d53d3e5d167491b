"""``build_engine --target pytorch``: the stage for TensorRT-LLM's PyTorch backend.

Writes, from the same model and quantization flags as the engine target,

* ``DIR/hf_quantized/``: modelopt's unified HF checkpoint (quantize/unified/), which
  ``tensorrt_llm.LLM(model=DIR/hf_quantized)``, ``trtllm-serve`` and the LLM-API Triton backend load;
* ``DIR/triton/``: TensorRT-LLM's LLM-API Triton model repository for it
  (builders/triton/llmapi.py ``write_llmapi_repo``), validated with Triton's ModelConfig schema
  (``validate_repo``) before it is renamed into place.

Everything a user can get wrong is checked before the (possibly long) calibration: the format
(``check_supported``), tp/pp against the head counts, an existing output without ``--force``, the
Triton options and the tokenizer. When the Triton step fails anyway, the checkpoint written in this
run is removed again: no half-written output.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from common.errors import UserError

CHECKPOINT_DIR = "hf_quantized"
TRITON_DIR = "triton"


def preflight(model, out_dir, spec, *, tp: int = 1, pp: int = 1, triton_options=None,
              triton: bool = True, force: bool = False) -> None:
    """Every check that needs no weights: one-line UserError, nothing written. ``model``: a
    model.source.ModelSource."""
    from builders.triton import TritonOptions, check_tokenizer
    from quantize.unified import check_supported
    from model.shape import preflight as tp_preflight

    check_supported(spec)
    for name, v in (("tp", tp), ("pp", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"--{name} must be a whole number >= 1 (got {v!r})")
    shape = model.shape
    tp_preflight(shape, tp, pp, can_pad=False)
    why = spec.format.unified_moe_refusal(spec) if shape.experts else None
    if why is not None:
        raise UserError(why)
    out_dir = Path(out_dir)
    for sub in (CHECKPOINT_DIR,) + ((TRITON_DIR,) if triton else ()):
        if (out_dir / sub).exists() and not force:
            raise UserError(f"{out_dir / sub} already exists: choose another --output or pass "
                            "--force to replace it")
    if triton:
        opts = TritonOptions.from_any(triton_options).for_target("pytorch")
        tok = opts.tokenizer_dir
        check_tokenizer(tok or model.directory, what="--tokenizer-dir" if tok else "model dir")


def build_pytorch_target(model_dir, out_dir, spec, *, tp: int = 1, pp: int = 1,
                         triton_options=None, triton: bool = True, force: bool = False,
                         calibrated_model=None, calib_text=None, tokenizer=None,
                         progress: bool = True, digests=None) -> dict:
    """``preflight``, then ``write_pytorch_target`` (the library entry; build_engine's plan runs
    the preflight itself, once)."""
    from model.source import ModelSource

    model = ModelSource.open(model_dir)
    preflight(model, out_dir, spec, tp=tp, pp=pp, triton_options=triton_options, triton=triton,
              force=force)
    return write_pytorch_target(model.directory, out_dir, spec, tp=tp, pp=pp,
                                triton_options=triton_options, triton=triton, force=force,
                                calibrated_model=calibrated_model, calib_text=calib_text,
                                tokenizer=tokenizer, progress=progress, digests=digests)


def write_pytorch_target(model_dir, out_dir, spec, *, tp: int = 1, pp: int = 1,
                         triton_options=None, triton: bool = True, force: bool = False,
                         calibrated_model=None, calibration=None, calib_text=None, tokenizer=None,
                         progress: bool = True, timings: dict | None = None,
                         digests=None) -> dict:
    """Write ``out_dir/hf_quantized`` (and ``out_dir/triton`` unless ``triton`` is False).

    Returns {"checkpoint": Path, "triton": Path | None, "hf_quant_config": dict | None}.
    ``calibrated_model``/``calibration``/``calib_text``/``tokenizer``/``timings``/``digests``:
    see quantize.unified.write_unified_checkpoint.
    """
    from builders.triton import validate_repo, write_llmapi_repo
    from quantize.unified import write_unified_checkpoint

    out_dir = Path(out_dir)
    ckpt = out_dir / CHECKPOINT_DIR
    hf_quant = write_unified_checkpoint(model_dir, ckpt, spec, calibrated_model=calibrated_model,
                                        calibration=calibration, calib_text=calib_text,
                                        tokenizer=tokenizer, force=force, progress=progress,
                                        timings=timings, digests=digests)
    repo = None
    if triton:
        try:
            opts = dict(vars(triton_options)) if triton_options is not None and hasattr(
                triton_options, "__dict__") else dict(triton_options or {})
            opts["force"] = force
            repo = write_llmapi_repo(out_dir / TRITON_DIR, model_dir=ckpt, tp=tp, pp=pp,
                                     options=opts)
            validate_repo(repo)
        except BaseException:
            shutil.rmtree(ckpt, ignore_errors=True)  # no half-written output
            raise
    return {"checkpoint": ckpt, "triton": repo, "hf_quant_config": hf_quant}
