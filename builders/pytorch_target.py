"""``build_engine --target pytorch``: the stage for TensorRT-LLM's PyTorch backend.

Writes, from the same model and quantization flags as the engine target,

* ``DIR/hf_quantized/``: modelopt's unified HF checkpoint (quantize/unified/), which
  ``tensorrt_llm.LLM(model=DIR/hf_quantized)``, ``trtllm-serve`` and the LLM-API Triton backend load;
* ``DIR/triton/``: TensorRT-LLM's LLM-API Triton model repository for it
  (builders/triton/llmapi.py ``write_llmapi_repo``), validated with Triton's ModelConfig schema
  (``validate_repo``) before it is renamed into place.

Everything a user can get wrong is checked before the (possibly long) calibration: the format
(``check_supported``), tp/pp against the head counts, an existing output without ``--force``, the
Triton options and the tokenizer. The checkpoint is written staged (``hf_quantized.partial``) and
put in place once complete (build_engine's run: once its quality gate and ``--verify`` passed on
the stage); the repository is written after it, in a stage of its own. A Triton step that fails
anyway leaves the complete checkpoint and no repository, as the engine target does.
"""
from __future__ import annotations

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
                         calibrated_model=None, calib_text=None, tokenizer=None,
                         progress: bool = True, digests=None) -> dict:
    """Write ``out_dir/hf_quantized`` (and ``out_dir/triton`` unless ``triton`` is False), with no
    checks between (build_engine's run checks the staged checkpoint first:
    pipeline.pytorch_target).

    Returns {"checkpoint": Path, "triton": Path | None, "hf_quant_config": dict | None}.
    ``calibrated_model``/``calib_text``/``tokenizer``/``digests``: see
    quantize.unified.write_unified_checkpoint.
    """
    staged, hf_quant = stage_checkpoint(model_dir, out_dir, spec, force=force,
                                        calibrated_model=calibrated_model, calib_text=calib_text,
                                        tokenizer=tokenizer, progress=progress, digests=digests)
    ckpt = put_in_place(out_dir, digests, triton=triton)
    repo = write_repo(out_dir, tp=tp, pp=pp, triton_options=triton_options,
                      force=force) if triton else None
    return {"checkpoint": ckpt, "triton": repo, "hf_quant_config": hf_quant}


def stage_checkpoint(model_dir, out_dir, spec, *, force: bool = False, calibrated_model=None,
                     calibration=None, calib_text=None, tokenizer=None, progress: bool = True,
                     timings: dict | None = None, digests=None,
                     allow_nonfinite: bool = False) -> tuple[Path, dict | None]:
    """The unified checkpoint, complete in its stage ``out_dir/hf_quantized.partial`` for the
    run's checks (nothing in ``out_dir/hf_quantized`` changes yet): (that stage, its
    hf_quant_config). A failure removes the stage."""
    from quantize.unified import checkpoint as unified

    ckpt = Path(out_dir) / CHECKPOINT_DIR
    hf_quant = unified.write_unified_checkpoint(
        model_dir, ckpt, spec, calibrated_model=calibrated_model, calibration=calibration,
        calib_text=calib_text, tokenizer=tokenizer, force=force, progress=progress,
        timings=timings, digests=digests, allow_nonfinite=allow_nonfinite, promote=False)
    return unified.staged_dir(ckpt), hf_quant


def put_in_place(out_dir, digests=None, *, triton: bool = True) -> Path:
    """The checked staged checkpoint goes in place of ``out_dir/hf_quantized``; what described the
    one it replaces goes with it (build.json, and the tool's own ``triton/`` when this run
    writes a new one), so a run that fails later adopts nothing. Returns its directory."""
    from pipeline.outputs import MANIFEST, remove_stale
    from quantize.unified.checkpoint import put_in_place as promote

    ckpt = promote(Path(out_dir) / CHECKPOINT_DIR, digests)
    remove_stale(Path(out_dir), ((TRITON_DIR,) if triton else ()) + (MANIFEST,))
    return ckpt


def write_repo(out_dir, *, tp: int = 1, pp: int = 1, triton_options=None,
               force: bool = False) -> Path:
    """``out_dir/triton``: the LLM-API repository serving the checkpoint in place, written in a
    private stage, validated, then renamed into place (builders.triton)."""
    from builders.triton import validate_repo, write_llmapi_repo

    opts = dict(vars(triton_options)) if triton_options is not None and hasattr(
        triton_options, "__dict__") else dict(triton_options or {})
    opts["force"] = force
    repo = write_llmapi_repo(Path(out_dir) / TRITON_DIR, model_dir=Path(out_dir) / CHECKPOINT_DIR,
                             tp=tp, pp=pp, options=opts)
    validate_repo(repo)
    return repo
