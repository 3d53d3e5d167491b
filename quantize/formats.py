"""Quantization options: the command-line flags, their validation, and what each format means.

``add_quant_arguments(parser)`` adds the flags; ``QuantSpec.from_args(args)`` validates them before
any work starts (one-line :class:`common.errors.UserError` on a mistake) and returns a frozen
:class:`QuantSpec` that says

* what the TensorRT-LLM checkpoint declares (``quant_algo``, ``kv_cache_quant_algo``, ...; see
  :meth:`QuantSpec.to_trtllm_quantization`, the ``quantization`` block of ``config.json`` exactly as
  nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint`` writes it for that format),
* whether calibration is needed and with which modelopt config (:meth:`QuantSpec.modelopt_config`),
* where the calibration text is and how much of it to use.

Formats (TensorRT-LLM ``QuantAlgo`` names; see quantize/NOTES.md for the tensors of each):

==================  =========================  ==========================================
flag                quant_algo                 how
==================  =========================  ==========================================
(none)              None                       fp16/bf16 weights
--smoothquant [A]   W8A8_SQ_PER_CHANNEL_       TensorRT-LLM's own SmoothQuant (convert_checkpoint.py
                    PER_TOKEN_PLUGIN           --smoothquant A --per_channel --per_token), alpha A
                                               (default 0.75; ``auto``: searched); --sq-weights /
                                               --sq-activations pick the other three plugin formats
  --sq-recipe       W8A8_SQ_PER_CHANNEL        modelopt INT8_SMOOTHQUANT_CFG, alpha A (default 1.0)
    modelopt
--fp8               FP8                        modelopt FP8_DEFAULT_CFG
--awq               W4A16_AWQ                  modelopt INT4_AWQ_CFG (group 128 or 64)
--int8-weight-only  W8A16                      float weights; trtllm-build quantizes them
--int4-weight-only  W4A16                      float weights; trtllm-build quantizes them
--kv-cache-dtype    kv_cache_quant_algo INT8   k/v_bmm_quantizer calibration (any format)
                    or FP8
==================  =========================  ==========================================
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from common.errors import UserError

from .algos import (  # noqa: F401  (re-exported: the formats' names live here for callers)
    ALL_ALGOS, AWQ_GROUP_SIZES, DEFAULT_AWQ_GROUP_SIZE, DEFAULT_CALIB_BATCH_SIZE, DEFAULT_CALIB_DATA,
    DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SIZE, DEFAULT_SMOOTHQUANT_ALPHA, DEFAULT_SQ_PLUGIN_ALPHA, FP8,
    KV_CACHE_DTYPES, MODELOPT_ALGOS, MODELOPT_EXCLUDE_MODULES, SMOOTHQUANT, SQ_PLUGIN, SQ_PLUGIN_ALGOS,
    SQ_RECIPES, TRTLLM_DEFAULT_EXCLUDE_MODULES, W4A16, W4A16_AWQ, W8A16, WEIGHT_ONLY_ALGOS, _WEIGHT_FLAGS)
from .flags import add_quant_arguments, sq_algo  # noqa: F401  (add_quant_arguments re-exported)


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization request.

    ``quant_algo`` / ``kv_cache_quant_algo`` use TensorRT-LLM's ``QuantAlgo`` names. ``group_size``,
    ``has_zero_point`` and ``pre_quant_scale`` are only meaningful (and only written) for AWQ.
    ``exclude_modules`` is the list written to config.json (None: the key is omitted and TensorRT-LLM
    applies its own defaults).
    """

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: tuple[str, ...] | None = None
    smoothquant_alpha: float | None = None  # None with sq_alpha_search: chosen per layer at calibration
    sq_alpha_search: bool = False
    max_ppl_increase: float | None = None
    calib_data: Path = DEFAULT_CALIB_DATA
    calib_size: int = DEFAULT_CALIB_SIZE
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN
    calib_batch_size: int = DEFAULT_CALIB_BATCH_SIZE

    # ----- construction -----------------------------------------------------------------------

    @classmethod
    def from_args(cls, args) -> "QuantSpec":
        """Validate the parsed flags (see :func:`add_quant_arguments`); raise UserError on a mistake."""
        chosen = [(algo, flag) for attr, algo, flag in _WEIGHT_FLAGS
                  if getattr(args, attr, None) not in (None, False)]
        if len(chosen) > 1:
            raise UserError(
                f"choose one weight quantization format, got {' and '.join(f for _, f in chosen)}; "
                "--kv-cache-dtype can be combined with any one of them")
        quant_algo = chosen[0][0] if chosen else None
        alpha = getattr(args, "smoothquant", None)
        if quant_algo == SMOOTHQUANT:
            quant_algo = sq_algo(args)
        else:
            for flag in ("sq_recipe", "sq_activations", "sq_weights"):
                if getattr(args, flag, None) is not None:
                    raise UserError(f"--{flag.replace('_', '-')} applies to --smoothquant; add it or drop the flag")
        return cls.create(
            quant_algo,
            kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
            smoothquant_alpha=None if alpha == "default" else alpha,
            awq_block_size=getattr(args, "awq_block_size", None),
            max_ppl_increase=getattr(args, "max_ppl_increase", None),
            calib_data=getattr(args, "calib_data", None),
            calib_size=getattr(args, "calib_size", DEFAULT_CALIB_SIZE),
            calib_seq_len=getattr(args, "calib_seq_len", DEFAULT_CALIB_SEQ_LEN),
            calib_batch_size=getattr(args, "calib_batch_size", DEFAULT_CALIB_BATCH_SIZE),
        )

    @classmethod
    def create(cls, quant_algo: str | None = None, *, kv_cache_dtype: str | None = None,
               smoothquant_alpha: float | str | None = None, awq_block_size: int | None = None,
               max_ppl_increase: float | None = None, calib_data: str | Path | None = None, calib_size: int = DEFAULT_CALIB_SIZE,
               calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
               calib_batch_size: int = DEFAULT_CALIB_BATCH_SIZE) -> "QuantSpec":
        """Build and validate a spec from TensorRT-LLM names (what ``from_args`` calls)."""
        kv = _check_algo_and_kv(quant_algo, kv_cache_dtype)
        alpha, search = _smoothquant_alpha(quant_algo, smoothquant_alpha, kv)
        if max_ppl_increase is not None and not (max_ppl_increase >= 0 and math.isfinite(max_ppl_increase)):
            raise UserError(f"--max-ppl-increase must be a percentage >= 0, got {max_ppl_increase}")
        group_size = _awq_group_size(quant_algo, awq_block_size)
        for name, value in (("--calib-size", calib_size), ("--calib-seq-len", calib_seq_len),
                            ("--calib-batch-size", calib_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if quant_algo in WEIGHT_ONLY_ALGOS:
            exclude = TRTLLM_DEFAULT_EXCLUDE_MODULES
        elif quant_algo in MODELOPT_ALGOS:
            exclude = MODELOPT_EXCLUDE_MODULES
        else:
            exclude = None  # modelopt (and TensorRT-LLM's plugin SQ converter) write none / null
        spec = cls(
            quant_algo=quant_algo,
            kv_cache_quant_algo=kv,
            group_size=group_size,
            has_zero_point=False,
            pre_quant_scale=quant_algo == W4A16_AWQ,
            exclude_modules=exclude,
            smoothquant_alpha=alpha,
            sq_alpha_search=search,
            max_ppl_increase=max_ppl_increase,
            calib_data=Path(calib_data) if calib_data is not None else DEFAULT_CALIB_DATA,
            calib_size=calib_size,
            calib_seq_len=calib_seq_len,
            calib_batch_size=calib_batch_size,
        )
        if max_ppl_increase is not None and not spec.needs_calibration:
            raise UserError("--max-ppl-increase gates calibrated formats (SmoothQuant, FP8, AWQ, a quantized "
                            "KV cache); drop it or add one")
        if spec.needs_calibration or calib_data is not None:
            check_calib_file(spec.calib_data)
        return spec

    # ----- what it means ----------------------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        return self.quant_algo is not None or self.kv_cache_quant_algo is not None

    @property
    def is_weight_only(self) -> bool:
        """W8A16/W4A16: the checkpoint carries float weights; trtllm-build quantizes them."""
        return self.quant_algo in WEIGHT_ONLY_ALGOS

    @property
    def needs_calibration(self) -> bool:
        """True when modelopt must run calibration data through the model (SQ, FP8, AWQ, KV cache)."""
        return (self.quant_algo in MODELOPT_ALGOS or self.is_sq_plugin
                or self.kv_cache_quant_algo is not None)

    @property
    def is_sq_plugin(self) -> bool:
        """TensorRT-LLM's own SmoothQuant (forward-hook ranges, quantize/smoothquant.py), not modelopt."""
        return self.quant_algo in SQ_PLUGIN

    @property
    def is_max_calibrated(self) -> bool:
        """modelopt's ``max`` algorithm (FP8, a KV cache alone): running maxima, which the
        layer-wise calibration records with forward hooks (quantize/max_layerwise.py)."""
        return (self.needs_calibration and not self.is_sq_plugin
                and self.quant_algo not in (SMOOTHQUANT, W4A16_AWQ))

    @property
    def recipe(self) -> str | None:
        """The SmoothQuant recipe in words (None: not SmoothQuant): one name, one numerics contract."""
        if self.quant_algo == SMOOTHQUANT:
            return (f"modelopt {SMOOTHQUANT} (alpha {self.smoothquant_alpha:g}): int8 weights per channel, "
                    "int8 activations with one static scale per tensor")
        if not self.is_sq_plugin:
            return None
        per_channel, per_token = next(k for k, v in SQ_PLUGIN_ALGOS.items() if v == self.quant_algo)
        alpha = "searched per layer" if self.sq_alpha_search else f"{self.smoothquant_alpha:g}"
        return (f"TensorRT-LLM {self.quant_algo} (alpha {alpha}): int8 weights "
                f"{'per channel' if per_channel else 'per tensor'}, int8 activations "
                f"{'per token (dynamic)' if per_token else 'per tensor (static)'}")

    @property
    def name(self) -> str:
        """Short human name, e.g. 'W4A16_AWQ (group 128) + INT8 KV cache'."""
        parts = []
        if self.quant_algo == SMOOTHQUANT or self.is_sq_plugin:
            alpha = "auto" if self.sq_alpha_search else f"{self.smoothquant_alpha:g}"
            parts.append(f"{self.quant_algo} (alpha {alpha})")
        elif self.quant_algo == W4A16_AWQ:
            parts.append(f"{self.quant_algo} (group {self.group_size})")
        elif self.quant_algo:
            parts.append(self.quant_algo)
        if self.kv_cache_quant_algo:
            parts.append(f"{self.kv_cache_quant_algo} KV cache")
        return " + ".join(parts) or "unquantized"

    def read_calib_text(self) -> str:
        """The calibration text (validated non-empty)."""
        return check_calib_file(self.calib_data)

    def modelopt_config(self) -> dict | None:
        """A fresh copy of the ``mtq.quantize`` config for this spec (None: nothing to calibrate).

        SQ/FP8/AWQ start from modelopt's INT8_SMOOTHQUANT_CFG / FP8_DEFAULT_CFG / INT4_AWQ_CFG (alpha
        and block size set as requested); a KV-cache dtype appends ``*[kv]_bmm_quantizer`` entries
        (FP8: modelopt's FP8_KV_CFG; INT8: the same with num_bits 8). Weight-only formats with a
        quantized KV cache calibrate the KV cache alone (every other quantizer disabled).
        """
        if not self.needs_calibration or self.is_sq_plugin:
            return None  # the plugin recipe calibrates with forward hooks (quantize/smoothquant.py)
        import modelopt.torch.quantization as mtq

        if self.quant_algo == SMOOTHQUANT:
            cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
            cfg["algorithm"] = {"method": "smoothquant", "alpha": self.smoothquant_alpha}
        elif self.quant_algo == FP8:
            cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
        elif self.quant_algo == W4A16_AWQ:
            cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
            _set_awq_block_size(cfg, self.group_size)
        else:  # KV cache only (unquantized or weight-only linears)
            cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
        if self.kv_cache_quant_algo == "FP8":
            kv_entries = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
        elif self.kv_cache_quant_algo == "INT8":
            kv_entries = [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}}]
        else:
            kv_entries = []
        cfg["quant_cfg"] = _as_list(cfg["quant_cfg"]) + kv_entries
        return cfg

    def to_trtllm_quantization(self) -> dict:
        """The ``quantization`` block of config.json, with modelopt 0.47's keys, values and order.

        SQ / FP8:  {quant_algo, kv_cache_quant_algo, exclude_modules: ["lm_head"]}
        AWQ:       {quant_algo, kv_cache_quant_algo, group_size, has_zero_point: false,
                    pre_quant_scale: true, exclude_modules: ["lm_head"]}
        KV only / none: {quant_algo: null, kv_cache_quant_algo}   (no exclude_modules, as modelopt)
        W8A16 / W4A16: {quant_algo, kv_cache_quant_algo, exclude_modules: TensorRT-LLM's defaults}
        """
        if self.is_sq_plugin:  # TensorRT-LLM's QuantConfig fields, as its convert_checkpoint.py writes them
            return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo,
                    "group_size": 128, "smoothquant_val": self.smoothquant_alpha, "clamp_val": None,
                    "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None}
        q: dict = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.quant_algo == W4A16_AWQ:
            q["group_size"] = self.group_size
            q["has_zero_point"] = self.has_zero_point
            q["pre_quant_scale"] = self.pre_quant_scale
        if self.exclude_modules is not None:
            q["exclude_modules"] = list(self.exclude_modules)
        return q


def _as_list(quant_cfg) -> list:
    if isinstance(quant_cfg, dict):  # older modelopt: {pattern: cfg}
        return [{"quantizer_name": k, **({"cfg": v} if "enable" not in v else v)} for k, v in quant_cfg.items()]
    return list(quant_cfg)


def _set_awq_block_size(cfg: dict, group_size: int) -> None:
    found = False
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            wq = entry["cfg"][0] if isinstance(entry["cfg"], list) else entry["cfg"]
            wq["block_sizes"][-1] = group_size
            found = True
    if not found:  # pragma: no cover - guards against a modelopt layout change
        raise RuntimeError("modelopt's INT4_AWQ_CFG has no '*weight_quantizer' entry to set the block size on")


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def check_calib_file(path: str | Path) -> str:
    """Read the calibration text; UserError when it is missing, unreadable or empty."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--calib-data {p} does not exist; give a plain-text file or omit the flag "
                        "to use the shipped calibration text")
    if not p.is_file():
        raise UserError(f"--calib-data {p} is not a file; give a plain-text file")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"--calib-data {p} cannot be read: {e.strerror or e}") from None
    if not text.strip():
        raise UserError(f"--calib-data {p} is empty; calibration needs some text")
    return text


def check_awq_divisibility(in_dims_per_rank: Mapping[str, int] | Iterable[int] | Iterable[tuple[str, int]],
                           group_size: int = DEFAULT_AWQ_GROUP_SIZE) -> None:
    """AWQ preflight: every linear's per-rank input size must be a multiple of the group size.

    ``in_dims_per_rank``: {layer name: input features on one rank} (e.g. ``{"attention.dense":
    hidden // tp, "mlp.proj": intermediate // tp, "attention.qkv": hidden, ...}``), or plain sizes.
    Raises UserError naming the first offending layer (modelopt would fail in its export with
    "Weight shape ... is not divisible for block size"; TensorRT-LLM's kernels need whole groups).
    """
    if isinstance(in_dims_per_rank, Mapping):
        items = list(in_dims_per_rank.items())
    else:
        items = [x if isinstance(x, tuple) else (None, x) for x in in_dims_per_rank]
    for name, dim in items:
        if dim <= 0 or dim % group_size:
            what = f"{name} " if name else ""
            alt = [g for g in AWQ_GROUP_SIZES if g != group_size and dim > 0 and dim % g == 0]
            hint = (f"choose a --tp that keeps it a multiple of {group_size}"
                    + (f", or --awq-block-size {alt[0]}" if alt else ""))
            raise UserError(f"--awq: {what}input size per rank {dim} is not a multiple of the AWQ group "
                            f"size {group_size}; {hint}")


def check_kv_head_duplication(spec: QuantSpec, num_kv_heads: int, tp: int) -> None:
    """SmoothQuant with tp > num_kv_heads: modelopt 0.47 cannot duplicate per-channel k/v scales.

    (``build_qkv`` raises "Duplicating KV heads per-channel scales is not supported".) FP8 (scalar
    scales) and AWQ (2-D group scales) duplicate fine.
    """
    if spec.quant_algo in (SMOOTHQUANT, *SQ_PLUGIN) and tp > num_kv_heads:
        raise UserError(f"--smoothquant with --tp {tp} needs at least {tp} KV heads (the model has "
                        f"{num_kv_heads}): per-channel k/v scales cannot be duplicated across ranks; "
                        f"use --tp {num_kv_heads} or less, or another format")


def _check_algo_and_kv(quant_algo: str | None, kv_cache_dtype: str | None) -> str | None:
    """The KV cache's quant_algo, after refusing unknown names and combinations TensorRT-LLM has
    no recipe for."""
    valid = (None,) + ALL_ALGOS
    if quant_algo not in valid:
        raise UserError(f"unknown quant_algo {quant_algo!r}; supported: "
                        f"{', '.join(str(a) for a in valid)}")
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; choose int8 or fp8")
    kv = KV_CACHE_DTYPES.get(kv_cache_dtype) if kv_cache_dtype else None
    if quant_algo == FP8 and kv == "INT8":
        raise UserError(
            "--fp8 with --kv-cache-dtype int8 is not supported: TensorRT-LLM's FP8 recipe pairs "
            "FP8 GEMMs with an FP8 KV cache (FP8 context FMHA); use --kv-cache-dtype fp8")
    return kv


def _smoothquant_alpha(quant_algo: str | None, value, kv: str | None) -> tuple[float | None, bool]:
    """(alpha, search per layer) of a SmoothQuant recipe; (None, False) for the other formats."""
    if quant_algo not in (SMOOTHQUANT, *SQ_PLUGIN):
        if value is not None:
            raise UserError("a SmoothQuant alpha was given without --smoothquant")
        return None, False
    if value == "auto":
        if quant_algo == SMOOTHQUANT:
            raise UserError("--smoothquant auto searches alpha for TensorRT-LLM's recipe only; give "
                            "--sq-recipe modelopt a number (default 1.0) or drop --sq-recipe")
        alpha, search = None, True
    else:
        default = DEFAULT_SMOOTHQUANT_ALPHA if quant_algo == SMOOTHQUANT else DEFAULT_SQ_PLUGIN_ALPHA
        alpha, search = (default if value is None else float(value)), False
        if not (0.0 <= alpha <= 1.0):
            raise UserError(f"--smoothquant alpha must be in [0, 1], got {alpha}")
    if quant_algo in SQ_PLUGIN and kv == "FP8":
        raise UserError("--kv-cache-dtype fp8 with TensorRT-LLM's SmoothQuant recipe: its converter "
                        "writes a placeholder FP8 KV scale of 1.0; use --kv-cache-dtype int8, or "
                        "--sq-recipe modelopt for a calibrated FP8 KV cache")
    return alpha, search


def _awq_group_size(quant_algo: str | None, awq_block_size: int | None) -> int | None:
    if awq_block_size is not None and quant_algo != W4A16_AWQ:
        raise UserError("--awq-block-size only applies to --awq; add --awq or drop it")
    if quant_algo != W4A16_AWQ:
        return None
    group_size = DEFAULT_AWQ_GROUP_SIZE if awq_block_size is None else int(awq_block_size)
    if group_size not in AWQ_GROUP_SIZES:
        raise UserError(f"--awq-block-size {group_size} is not supported by TensorRT-LLM's "
                        f"INT4 group-wise kernels; use one of {', '.join(map(str, AWQ_GROUP_SIZES))}")
    return group_size
