"""modelopt's "unified" quantized Hugging Face checkpoint, for TensorRT-LLM's PyTorch backend.

``write_unified_checkpoint(model_dir, out_dir, spec)`` writes ``out_dir/`` with the tensors, file
set and JSON that nvidia-modelopt 0.47's ``modelopt.torch.export.export_hf_checkpoint`` writes for
the same calibrated model (checked tensor for tensor by tests/test_pytorch_target.py):

* ``model.safetensors``: HF names (``model.layers.i.self_attn.q_proj.weight`` ...); per quantized
  linear ``weight`` (quantized) + ``weight_scale`` / ``input_scale`` / ``pre_quant_scale``, and with an
  FP8 KV cache ``self_attn.k_proj.k_scale`` / ``self_attn.v_proj.v_scale``;
* ``hf_quant_config.json`` (``{"producer", "quantization"}``) and ``config.json`` = the source's
  config plus ``quantization_config`` (modelopt's ``convert_hf_quant_config_format``);
* the source's tokenizer / generation files, so the directory serves on its own.

Per format (each recipe's ``unified``, quantize/recipes/; what modelopt 0.47's unified export does, read from
``unified_export_hf.py`` / ``quant_utils.py`` and observed):

==================== ====================================================================
W8A8_SQ_PER_CHANNEL  int8 [out, in], weight_scale f32 [out], input_scale f32 [], pre_quant_scale
                     [in] on every linear; linears sharing an input (q/k/v, gate/up) are fused
                     first (averaged pre_quant_scale + re-smoothed weight, max input amax)
FP8                  float8_e4m3fn [out, in], weight_scale f32 [], input_scale f32 []; no fusion
                     (each linear keeps its own scales)
W4A16_AWQ            uint8 [out/2, in] (two int4 along out, low nibble = even row), weight_scale
                     [out, in/group]; q/k/v and gate/up fused, then their pre_quant_scale is
                     folded into input_layernorm / post_attention_layernorm; o_proj / down_proj keep
                     pre_quant_scale [in]
W4A8_AWQ             as W4A16_AWQ, + weight_scale_2 f32 [] (the FP8 stage) and input_scale f32 [];
                     from the whole calibrated model (no store path)
W8A16                int8 [out, in], weight_scale f32 [out] = row absmax / 127 — needs no
                     calibration, so it streams from the float weights (modelopt: INT8_WEIGHT_ONLY_CFG)
NVFP4                uint8 [out, in/2] (two E2M1 along in, low nibble = even input), weight_scale
                     E4M3 [out, in/16], weight_scale_2 / input_scale f32 [] (global / (6 * 448));
                     q/k/v and gate/up share their globals (the recipe's ``unified_linear``)
KV cache FP8         k_scale / v_scale f32 = k/v_bmm_quantizer amax / 448
==================== ====================================================================

Calibration: every calibrated format calibrates layer by layer into the calibration store that
the engine target uses too (``DIR/calibration``, reusable with ``--calibration`` by either
target), which keeps what the unified form needs besides the TensorRT-LLM export
(store_entries.py); its tensors are computed one layer at a time while the file is written
(from_store.StoreLayers), so the peak memory does not grow with depth. ``calibrated_model``: a
model calibrated whole in memory instead (tests, benchmarks).

Refused (one line, ``UNSUPPORTED``): ``--int4-weight-only`` (no per-channel INT4 in the unified
format) and ``--kv-cache-dtype int8`` (modelopt 0.47's unified export asserts "Invalid KV cache
quantization format" on it).

Dtypes: float tensors that modelopt writes in the model's dtype (embeddings, norms, lm_head,
biases, pre_quant_scale) are written in the *source checkpoint's* dtype (calibration runs in fp32 on
CPU; a deployment wants the source's fp16/bf16); quantized weights are computed from the weights in
that dtype (modelopt's ``dtype`` argument); scales stay float32 as modelopt writes them. Unquantized
tensors are copied from the source file by file, never loaded all at once.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from common.atomic import write_text
from common.errors import IO_ERRNOS, UserError, io_error, naming
from common.staged import StagedOutput
from convert.convert import refuse_nonfinite
from convert.block_fp8 import block_size, open_source
from convert.source import SourceCheckpoint
from convert.source_files import declared_dtype
from convert.writer import write_file
from model.families import ARCHITECTURES, FAMILIES

from ..torch_io import read_tensor, torch_chunks
from .config import hf_quant_config, quantization_config
from ..modelopt_state import model_family
from .experts import expert_linear_pattern, moe_tensors, partner_weight, weight_only_pair
from .from_store import StoreLayers
from .tensors import model_tensors, weight_only_int8

Tensor = torch.Tensor
LLAMA = FAMILIES["llama"]

SAFETENSORS = "model.safetensors"
HF_QUANT_CONFIG = "hf_quant_config.json"
#: Non-weight files copied from the source so TensorRT-LLM's LLM(model=DIR) finds its tokenizer.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
#: tensors a checkpoint keeps in float32 beside a bf16 model (DeepSeek-V3's router correction
#: bias, as released): not the model's dtype
FLOAT32_BUFFERS = (".e_score_correction_bias",)


def _linears(family):
    """Whether a source tensor is a quantized linear's weight: the family's dense linears and
    its experts' (a mixture of experts)."""
    dense = re.compile(r"^(model\.layers\.\d+)\.(" + "|".join(map(re.escape, family.hf_linears()))
                       + r")\.weight$")
    experts = expert_linear_pattern(family) if family.moe is not None else None
    return lambda name: bool(dense.match(name) or experts is not None and experts.match(name))


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple
    dtype: torch.dtype
    source: str | None = None      # copy this source tensor as it is
    tensor: Tensor | None = None   # or write this one
    weight_only: bool = False      # or quantize this source weight (W8A16), part 0 = weight
    partner: str | None = None     # W8A16: the expert weight it shares its row amax with
    layer: int | None = None       # or this layer's tensor from the calibration store


def _plan(source: SourceCheckpoint, computed: dict[str, Tensor], spec, layers=None,
          family=None) -> list[_Entry]:
    entries: dict[str, _Entry] = {}
    family = family or LLAMA
    is_linear = _linears(family)
    fmt = spec.format.unified
    # W8A16: the linears not computed (all, or a mixture's experts beside a KV calibration)
    wo = fmt.from_float_weights and fmt.weight is not None
    streamed = {}
    for i in range(layers.num_layers if layers is not None else 0):
        streamed.update({n: (i, sh, dt) for n, (sh, dt) in layers.names(i).items()})
    for name, (_, shape, dtype) in source.meta.items():
        if name in computed or name in streamed:
            continue
        if wo and is_linear(name):
            out_dim, partner = shape[0], partner_weight(family, name) if family.moe else None
            entries[name] = _Entry(name, shape, torch.int8, source=name, weight_only=True,
                                   partner=partner)
            sname = name[: -len("weight")] + "weight_scale"
            entries[sname] = _Entry(sname, (out_dim,), torch.float32, source=name, weight_only=True,
                                    partner=partner)
        else:
            entries[name] = _Entry(name, shape, dtype, source=name)
    for name, t in computed.items():
        entries[name] = _Entry(name, tuple(t.shape), t.dtype, tensor=t)
    for name, (i, shape, dtype) in streamed.items():
        entries[name] = _Entry(name, shape, dtype, layer=i)
    return [entries[k] for k in sorted(entries)]


def _family(config: dict):
    """The model.spec.Family of a source config.json (None: not a registered architecture)."""
    name = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    return FAMILIES.get(name)


def _open_float_source(model_dir: Path, config: dict) -> SourceCheckpoint:
    """The source as a float model: a block-scaled fp8 one dequantized when read, and written
    as that float model (its ``quantization_config`` dropped from ``config``)."""
    source = open_source(model_dir, config, declared_dtype(config))
    if block_size(config) is not None:
        config.pop("quantization_config")
    return source


def _check_source_dtype(source: SourceCheckpoint) -> torch.dtype:
    dtypes = {d for n, (_, _, d) in source.meta.items()
              if d.is_floating_point and not n.endswith(FLOAT32_BUFFERS)}
    if len(dtypes) != 1:
        raise UserError(f"{source.dir}: float tensors in several dtypes ({sorted(map(str, dtypes))}); "
                        "save the model in one dtype first")
    return dtypes.pop().torch  # the source's dtypes are bytes-level (common.dtypes)


def _write_tensors(path: Path, source: SourceCheckpoint, entries: list[_Entry], layers=None,
                   digests=None) -> None:
    cache: dict[str, tuple[Tensor, Tensor]] = {}

    def produce(e: _Entry):
        if e.tensor is not None:
            yield e.tensor
        elif e.layer is not None:
            yield layers.tensor(e.layer, e.name)
        elif e.weight_only:
            if e.source not in cache:
                cache.clear()
                w = read_tensor(source, e.source)
                cache[e.source] = weight_only_int8(w) if e.partner is None else \
                    weight_only_pair(w, read_tensor(source, e.partner))
            yield cache[e.source][0 if e.dtype == torch.int8 else 1]
        else:
            yield read_tensor(source, e.source)

    write_file(path, entries, torch_chunks(produce), digests=digests)


def _read_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None


def _quant_tensors(model_dir: Path, source, spec, dtype, calibrated_model, calibration, calib_text,
                   tokenizer, device, progress, timings, family=None):
    """(tensors computed whole, the layers streamed from the calibration store or None)."""
    if calibrated_model is None and calibration is not None:
        load_layer = calibration.calibrate(model_dir, source, spec, progress=progress,
                                           timings=timings)
        return {}, StoreLayers(load_layer, source, spec, dtype, calibration.compute_dtype,
                               _num_layers(source), family or LLAMA)
    model = calibrated_model
    if model is None:
        import time

        from ..calibrate import calibrate

        t0 = time.perf_counter()
        model = calibrate(model_dir, spec, calib_text, tokenizer=tokenizer, device=device,
                          progress=progress)
        timings["calibration"] = time.perf_counter() - t0
    computed = model_tensors(model, spec, dtype)
    family = model_family(model)
    if family.moe is not None and spec.format.unified.weight is not None:
        computed.update(moe_tensors(model, spec, family, dtype))
    for name in computed:
        if name not in source and not name.endswith(("_scale", "_scale_2")):
            raise UserError(f"{name} is not in {model_dir}: the calibrated model does not match the "
                            "source checkpoint")
    return computed, None


def _num_layers(source) -> int:
    found = {int(m.group(1)) for n in source.meta if (m := re.match(r"^model\.layers\.(\d+)\.", n))}
    return len(found)


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def _write_dir(tmp: Path, model_dir: Path, source, entries, layers, config: dict, hf_quant,
               digests=None) -> None:
    _write_tensors(tmp / SAFETENSORS, source, entries, layers, digests)
    write_text(tmp / "config.json", json.dumps(config, indent=4) + "\n")
    if hf_quant is not None:
        write_text(tmp / HF_QUANT_CONFIG, json.dumps(hf_quant, indent=4))
    for f in COPIED_FILES:
        if (model_dir / f).is_file():
            with naming(tmp / f):
                shutil.copyfile(model_dir / f, tmp / f)


def write_unified_checkpoint(model_dir, out_dir, spec, *, calibrated_model=None, calibration=None,
                             calib_text=None, tokenizer=None, device="auto", force: bool = False,
                             progress: bool = True, timings: dict | None = None,
                             digests=None, allow_nonfinite: bool = False,
                             promote: bool = True) -> dict | None:
    """Write the unified checkpoint of ``model_dir`` for ``spec`` to ``out_dir``; return its
    hf_quant_config (None when unquantized).

    Calibrated formats: with ``calibration`` (a quantize.run.CalibrationRun; the recipe's
    ``unified_layerwise``), layer by layer into (or, reused, from) its store, the tensors streamed
    one layer at a time; otherwise the whole model is calibrated with modelopt
    (``calibrated_model``: an already calibrated model to use instead, e.g. the same one given to
    modelopt's export in a test or a benchmark). Written to ``out_dir.partial`` and renamed when
    complete (``promote=False``: left complete there for the caller's checks, which then put it
    in place with :func:`put_in_place`); an existing ``out_dir`` needs ``force``. This is the
    entry point for benchmarks. ``digests``: the run's ``common.digests.Digests``, told the tensor
    file's digest. NaN/Inf in the source are refused (naming the tensor and the count) unless
    ``allow_nonfinite``: a calibrated format before it calibrates, the others before promotion.
    """
    from .config import check_supported

    check_supported(spec)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose another --output or pass --force to replace it")
    config = _read_config(model_dir)
    family = _family(config)
    if spec.source_quant is not None:  # a pre-quantized input: its codes and scales as they are
        return _write_prequantized(model_dir, out_dir, spec, config, family, force=force,
                                   digests=digests, promote=promote)
    source = _open_float_source(model_dir, config)
    dtype = _check_source_dtype(source)
    computed, layers = {}, None
    scan = source.scan()  # in the background, while the tensors are computed and written
    if spec.needs_calibration or calibrated_model is not None:
        try:
            if not allow_nonfinite:  # calibrating NaN weights would waste the calibration
                refuse_nonfinite(scan)
            computed, layers = _quant_tensors(model_dir, source, spec, dtype, calibrated_model,
                                              calibration, calib_text, tokenizer, device,
                                              progress, {} if timings is None else timings,
                                              family)
        except BaseException:
            source.close()
            raise
    try:
        entries = _plan(source, computed, spec, layers, family)
        hf_quant = hf_quant_config(spec, family, _num_layers(source))
        if hf_quant is not None:
            config["quantization_config"] = quantization_config(spec, hf_quant)
        _stage(StagedOutput(out_dir), model_dir, source, entries, layers, config, hf_quant,
               digests, None if allow_nonfinite else scan, promote)
    finally:
        source.close()
    return hf_quant


def _write_prequantized(model_dir: Path, out_dir: Path, spec, config: dict, family, *, force,
                        digests, promote) -> dict:
    """A pre-quantized input's unified checkpoint: its codes and scales as they are."""
    from ..recipes.prequantized.unified import write_prequantized_unified

    config.pop("quantization_config", None)
    hf_quant = hf_quant_config(spec, family)
    config["quantization_config"] = quantization_config(spec, hf_quant)
    write_prequantized_unified(model_dir, out_dir, spec, hf_quant, config, force=force,
                               digests=digests, promote=promote)
    return hf_quant


def _stage(staged: StagedOutput, model_dir: Path, source, entries, layers, config: dict,
           hf_quant, digests, scan, promote: bool) -> None:
    """Write the checkpoint into its stage, refuse the source's NaN/Inf (``scan``, unless None),
    then promote it (or leave it for the caller's checks); a failure removes the stage."""
    try:
        staged.open(None, resume=False)  # a unified checkpoint is written in one go
        _write_dir(staged.stage, model_dir, source, entries, layers, config, hf_quant, digests)
        if scan is not None:
            refuse_nonfinite(scan)
        if promote:
            staged.promote(digests)
    except OSError as e:
        staged.discard()
        if e.errno not in IO_ERRNOS:
            raise
        raise io_error(e, staged.dest) from None
    except BaseException:
        staged.discard()
        raise

def staged_dir(out_dir) -> Path:
    """Where ``write_unified_checkpoint(..., promote=False)`` left the checkpoint of ``out_dir``."""
    return StagedOutput(out_dir).stage


def put_in_place(out_dir, digests=None) -> Path:
    """The checked checkpoint staged for ``out_dir`` goes in its place (an earlier one, the tool's
    own, replaced); returns ``out_dir``."""
    StagedOutput(out_dir).promote(digests)
    return Path(out_dir)
