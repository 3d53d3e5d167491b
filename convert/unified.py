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

Per format (``FORMATS``; what modelopt 0.47's unified export does, read from
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
W8A16                int8 [out, in], weight_scale f32 [out] = row absmax / 127 — needs no
                     calibration, so it streams from the float weights (modelopt: INT8_WEIGHT_ONLY_CFG)
KV cache FP8         k_scale / v_scale f32 = k/v_bmm_quantizer amax / 448
==================== ====================================================================

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

from common.staged import StagedOutput
from common.errors import UserError
from common.versions import dist_version
from model.families import FAMILIES

from .source import SourceCheckpoint
from .writer import write_file

Tensor = torch.Tensor

SAFETENSORS = "model.safetensors"
HF_QUANT_CONFIG = "hf_quant_config.json"
#: modelopt version whose unified format this reproduces (written as the producer when modelopt
#: itself is not importable; otherwise the installed version, as export_hf_checkpoint writes).
MODELOPT_FORMAT_VERSION = "0.47.0"
#: Non-weight files copied from the source so TensorRT-LLM's LLM(model=DIR) finds its tokenizer.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
#: What modelopt lists as not quantized for a Llama-family model (get_quant_config, sorted).
EXCLUDE_MODULES = ["lm_head", "model.embed_tokens"]
KV_MAXBOUND = 448.0  # modelopt: "kv cache scale as amax / 448 for both FP8 and NVFP4"

#: the Llama-family layout modelopt's unified export quantizes (the family spec's dense linears)
LAYOUT = FAMILIES["llama"]
_LINEAR = re.compile(r"^(model\.layers\.\d+)\.(" + "|".join(map(re.escape, LAYOUT.hf_linears()))
                     + r")\.weight$")


@dataclass(frozen=True)
class Format:
    """How modelopt's unified export treats one quant_algo."""

    fuse_shared_inputs: bool   # preprocess_linear_fusion on q/k/v and gate/up
    fold_into_norm: bool       # fuse_prequant_layernorm (AWQ)
    from_float_weights: bool   # no calibration: scales from the weights alone
    quantization_config_extra: tuple = ()  # convert_hf_quant_config_format's extra keys


_FP8_GROUP = {"group_0": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                          "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                          "targets": ["Linear"]}}

FORMATS: dict[str | None, Format] = {
    None: Format(False, False, True),
    "W8A8_SQ_PER_CHANNEL": Format(True, False, False),
    "FP8": Format(False, False, False, (("config_groups", _FP8_GROUP),)),
    "W4A16_AWQ": Format(True, True, False),
    "W8A16": Format(False, False, True),
}

UNSUPPORTED = {
    "W4A16": "--int4-weight-only has no modelopt unified-checkpoint format (INT4 there is group-wise "
             "AWQ); use --awq, or --target engine for per-channel INT4 weight-only",
    "kv:INT8": "--kv-cache-dtype int8 has no modelopt unified-checkpoint format (modelopt 0.47 exports "
               "FP8 KV-cache scales only); use --kv-cache-dtype fp8, or --target engine",
}


def check_supported(spec) -> None:
    """UserError (one line) when ``spec`` has no unified-checkpoint form, before any work."""
    if spec.quant_algo in UNSUPPORTED:
        raise UserError(f"--target pytorch: {UNSUPPORTED[spec.quant_algo]}")
    if spec.kv_cache_quant_algo and f"kv:{spec.kv_cache_quant_algo}" in UNSUPPORTED:
        raise UserError(f"--target pytorch: {UNSUPPORTED['kv:' + spec.kv_cache_quant_algo]}")
    if spec.quant_algo not in FORMATS:
        raise UserError(f"--target pytorch does not support {spec.name}; supported: "
                        f"{', '.join(str(a) for a in FORMATS if a)} or none")


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _producer() -> dict:
    # not installed: the format version we reproduce
    return {"name": "modelopt",
            "version": dist_version("nvidia-modelopt") or MODELOPT_FORMAT_VERSION}


def hf_quant_config(spec) -> dict | None:
    """``hf_quant_config.json`` as modelopt 0.47 writes it (None: unquantized, no file)."""
    if spec.quant_algo is None and spec.kv_cache_quant_algo is None:
        return None
    q: dict = {"quant_algo": spec.quant_algo, "kv_cache_quant_algo": spec.kv_cache_quant_algo}
    if spec.quant_algo is None:  # KV only: process_layer_quant_config's empty per-layer dict
        q["quantized_layers"] = {}
    else:
        if spec.quant_algo == "W4A16_AWQ":
            q.update(group_size=spec.group_size, has_zero_point=False, pre_quant_scale=True)
        q["exclude_modules"] = list(EXCLUDE_MODULES)
    return {"producer": _producer(), "quantization": q}


def quantization_config(hf_quant: dict) -> dict:
    """config.json's ``quantization_config`` (modelopt's convert_hf_quant_config_format)."""
    q = hf_quant["quantization"]
    out: dict = dict(FORMATS[q["quant_algo"]].quantization_config_extra)
    out["ignore"] = q.get("exclude_modules") or []
    if q["quant_algo"]:
        out["quant_algo"] = q["quant_algo"]
    if q["kv_cache_quant_algo"] == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hf_quant["producer"]
    out["quant_method"] = "modelopt"
    return out


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _int8_rows(w: Tensor, scale: Tensor) -> Tensor:
    return (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)


def weight_only_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """W8A16 from a float weight [out, in]: (int8 weight, f32 weight_scale [out]).

    modelopt: max calibration of the weight quantizer (axis 0) → export_amax (0 → 127) / 127, then
    ``(w / scale[:, None]).round().clamp(-128, 127)``.
    """
    from quantize.modelopt_state import sanitize_amax

    scale = sanitize_amax(w.abs().amax(dim=1).float(), 127.0) / 127.0
    return _int8_rows(w, scale), scale


@torch.no_grad()
def unified_quant_tensors(model, spec, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of a calibrated model that differ from the source checkpoint, by unified name.

    Linear weights (quantized) and their scales, AWQ's folded norms, KV-cache scales. ``dtype``:
    the checkpoint's float dtype (quantized weights are computed from the weights in it).
    """
    from quantize.modelopt_state import (_act_scale, _fuse, _Lin, _layer_prefixes, _linear_modules,
                                         _pack_int4, _weight_scale)

    algo = spec.quant_algo
    fmt = FORMATS[algo]
    out: dict[str, Tensor] = {}
    layers = _layer_prefixes(model)
    if not layers:
        raise UserError("no decoder layers named '*.layers.N.self_attn' found: not a Llama-family model")
    linears = _linear_modules(model)
    block = spec.group_size if algo == "W4A16_AWQ" else None
    for prefix in layers:
        if algo is None:
            break
        lins = {h: _Lin(linears[f"{prefix}.{h}"]) for h in LAYOUT.hf_linears()}
        if fmt.from_float_weights:  # W8A16: scales from the (unmodified) float weights
            for s, lin in lins.items():
                p = f"{prefix}.{s}"
                q, scale = weight_only_int8(lin.weight.to(dtype))
                out[f"{p}.weight"], out[f"{p}.weight_scale"] = q, scale
            continue
        for s, lin in lins.items():
            if lin.wq is None or not lin.wq.is_enabled:
                raise UserError(f"{prefix}: {s} has no enabled weight quantizer; was the model "
                                f"calibrated for {spec.name}?")
        # the linears sharing an input, and the norm that feeds them
        groups = [(LAYOUT.linear_of(names[0])[0].norm, names)
                  for names in LAYOUT.fusion_groups().values()]
        folded = set()
        if fmt.fuse_shared_inputs:
            for norm, names in groups:
                _fuse([lins[n] for n in names], block)
                head = lins[names[0]]
                if fmt.fold_into_norm and head.pqs is not None:
                    w = model.get_submodule(f"{prefix}.{norm}").weight.detach()
                    out[f"{prefix}.{norm}.weight"] = (w * head.pqs.to(w.device)).to(w.dtype).to(dtype)
                    folded.update(names)
        for s, lin in lins.items():
            p = f"{prefix}.{s}"
            w = lin.weight.to(dtype)
            if algo == "FP8":
                amax = lin.wq.amax.detach().float()
                mb = float(lin.wq.maxbound)
                scale = torch.tensor(amax.item() / mb) if amax.dim() == 1 else amax / mb
                out[f"{p}.weight"] = (w / scale).to(torch.float8_e4m3fn)
            else:
                scale = _weight_scale(lin, block)
                if algo == "W4A16_AWQ":
                    out[f"{p}.weight"] = _pack_int4(w, scale, block).view(torch.uint8)
                else:
                    out[f"{p}.weight"] = _int8_rows(w, scale)
            out[f"{p}.weight_scale"] = scale
            a = _act_scale(lin)
            if a is not None:
                out[f"{p}.input_scale"] = a.reshape(())
            if lin.pqs is not None and s not in folded:
                out[f"{p}.pre_quant_scale"] = lin.pqs.squeeze().to(dtype)
    if spec.kv_cache_quant_algo is not None:
        for prefix in layers:
            attn = model.get_submodule(f"{prefix}.self_attn")
            for kv in "kv":
                q = getattr(attn, f"{kv}_bmm_quantizer", None)
                if q is None or not q.is_enabled or getattr(q, "_amax", None) is None:
                    raise UserError(f"{prefix}: no calibrated {kv}_bmm_quantizer; was the model "
                                    f"calibrated for {spec.name}?")
                out[f"{prefix}.self_attn.{kv}_proj.{kv}_scale"] = q._amax.detach().float() / KV_MAXBOUND
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple
    dtype: torch.dtype
    source: str | None = None      # copy this source tensor as it is
    tensor: Tensor | None = None   # or write this one
    weight_only: bool = False      # or quantize this source weight (W8A16), part 0 = weight


def _plan(source: SourceCheckpoint, computed: dict[str, Tensor], spec) -> list[_Entry]:
    entries: dict[str, _Entry] = {}
    wo = spec.quant_algo == "W8A16" and not any(k.endswith(".weight_scale") for k in computed)
    for name, (_, shape, dtype) in source.meta.items():
        if name in computed:
            continue
        if wo and _LINEAR.match(name):
            out_dim = shape[0]
            entries[name] = _Entry(name, shape, torch.int8, source=name, weight_only=True)
            sname = name[: -len("weight")] + "weight_scale"
            entries[sname] = _Entry(sname, (out_dim,), torch.float32, source=name, weight_only=True)
        else:
            entries[name] = _Entry(name, shape, dtype, source=name)
    for name, t in computed.items():
        entries[name] = _Entry(name, tuple(t.shape), t.dtype, tensor=t)
    return [entries[k] for k in sorted(entries)]


def _check_source_dtype(source: SourceCheckpoint) -> torch.dtype:
    dtypes = {d for _, _, d in source.meta.values() if d.is_floating_point}
    if len(dtypes) != 1:
        raise UserError(f"{source.dir}: float tensors in several dtypes ({sorted(map(str, dtypes))}); "
                        "save the model in one dtype first")
    return dtypes.pop().torch  # the source's dtypes are bytes-level (common.dtypes)


def _write_tensors(path: Path, source: SourceCheckpoint, entries: list[_Entry],
                   digests=None) -> None:
    cache: dict[str, tuple[Tensor, Tensor]] = {}

    def produce(e: _Entry):
        if e.tensor is not None:
            yield e.tensor
        elif e.weight_only:
            if e.source not in cache:
                cache.clear()
                cache[e.source] = weight_only_int8(source.read(e.source))
            yield cache[e.source][0 if e.dtype == torch.int8 else 1]
        else:
            yield source.read(e.source)

    write_file(path, entries, produce, digests=digests)


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def write_unified_checkpoint(model_dir, out_dir, spec, *, calibrated_model=None, calib_text=None,
                             tokenizer=None, device="auto", force: bool = False,
                             progress: bool = True, digests=None) -> dict | None:
    """Write the unified checkpoint of ``model_dir`` for ``spec`` to ``out_dir``; return its
    hf_quant_config (None when unquantized).

    Calibrates with modelopt when ``spec`` needs it (``calibrated_model``: an already calibrated
    model to use instead, e.g. the same one given to modelopt's export in a test or a benchmark).
    Written to ``out_dir.partial`` and renamed when complete; an existing ``out_dir`` needs
    ``force``. Entry point for benchmarks (one call per format). ``digests``: the run's Digests.
    """
    check_supported(spec)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose another --output or pass --force to replace it")
    cfg_path = model_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    source = SourceCheckpoint(model_dir)
    dtype = _check_source_dtype(source)

    computed: dict[str, Tensor] = {}
    if spec.needs_calibration or calibrated_model is not None:
        model = calibrated_model
        if model is None:
            from quantize.calibrate import calibrate

            model = calibrate(model_dir, spec, calib_text, tokenizer=tokenizer, device=device,
                              progress=progress)
        computed = unified_quant_tensors(model, spec, dtype)
    for name in computed:
        if name not in source and not name.endswith(("_scale",)):
            raise UserError(f"{name} is not in {model_dir}: the calibrated model does not match the "
                            "source checkpoint")
    entries = _plan(source, computed, spec)

    hf_quant = hf_quant_config(spec)
    if hf_quant is not None:
        config["quantization_config"] = quantization_config(hf_quant)

    staged = StagedOutput(out_dir)
    tmp = staged.stage
    try:
        staged.open(None, resume=False)  # a unified checkpoint is written in one go
        _write_tensors(tmp / SAFETENSORS, source, entries, digests)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        if hf_quant is not None:
            (tmp / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=4))
        for f in COPIED_FILES:
            if (model_dir / f).is_file():
                shutil.copyfile(model_dir / f, tmp / f)
        staged.promote()
    except OSError as e:
        staged.discard()
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}; free space or choose another --output")
    except BaseException:
        staged.discard()
        raise
    finally:
        source.close()
    return hf_quant
