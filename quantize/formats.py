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

import math
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

from .algos import (  # noqa: F401  (re-exported: the formats' names live here for callers)
    ALL_ALGOS, AWQ_GROUP_SIZES, DEFAULT_AWQ_GROUP_SIZE, DEFAULT_CALIB_BATCH_SIZE, DEFAULT_CALIB_DATA,
    DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SIZE, DEFAULT_SMOOTHQUANT_ALPHA, DEFAULT_SQ_PLUGIN_ALPHA, FP8,
    KV_CACHE_DTYPES, MODELOPT_ALGOS, MODELOPT_EXCLUDE_MODULES, SMOOTHQUANT, SQ_PLUGIN, SQ_PLUGIN_ALGOS,
    SQ_RECIPES, TRTLLM_DEFAULT_EXCLUDE_MODULES, W4A16, W4A16_AWQ, W8A16, WEIGHT_FLAGS, WEIGHT_ONLY_ALGOS)
from .flags import add_quant_arguments, sq_algo  # noqa: F401  (add_quant_arguments re-exported)
from .recipes import MAX, Recipe, kv_cache_algo, recipe_for
from .recipes.modelopt import check_awq_divisibility  # noqa: F401  (AWQ's preflight, re-exported)


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization request.

    ``quant_algo`` / ``kv_cache_quant_algo`` use TensorRT-LLM's ``QuantAlgo`` names. ``group_size``,
    ``has_zero_point`` and ``pre_quant_scale`` are only meaningful (and only written) for AWQ.
    ``exclude_modules`` is the list written to config.json (None: the key is omitted and TensorRT-LLM
    applies its own defaults). Every format-dependent answer comes from the format's recipe,
    :attr:`format` (quantize/recipes/); the properties below delegate to it.
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
    #: the recipe's own sub-choice from its flag's value (e.g. --fp8-rowwise meta), validated by
    #: :meth:`Recipe.option`; None for recipes without one (kept out of repr: config.json and the
    #: tensors it changes already tell runs apart)
    recipe_option: str | None = field(default=None, repr=False)
    #: a pre-quantized input's ``convert.prequant.scheme.SourceQuant`` (None: a float input):
    #: its recipe is quantize/recipes/prequantized, whatever ``quant_algo`` it writes
    source_quant: object = None

    # ----- construction -----------------------------------------------------------------------

    @classmethod
    def from_args(cls, args) -> "QuantSpec":
        """Validate the parsed flags (see :func:`add_quant_arguments`); raise UserError on a mistake."""
        chosen = [(algo, flag) for attr, algo, flag in WEIGHT_FLAGS
                  if getattr(args, attr, None) not in (None, False)]
        if len(chosen) > 1:
            raise UserError(
                f"choose one weight quantization format, got {' and '.join(f for _, f in chosen)}; "
                "--kv-cache-dtype can be combined with any one of them")
        alpha = getattr(args, "smoothquant", None)
        recipe = recipe_for(chosen[0][0] if chosen else None)
        return cls.create(
            recipe.resolve_flags(args),
            recipe_option=recipe.flag_option(args),
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
    def for_source(cls, source_quant) -> "QuantSpec":
        """The spec of a pre-quantized input (``convert.prequant.scheme.SourceQuant``)."""
        if source_quant.fp8:
            return cls(quant_algo=source_quant.quant_algo, source_quant=source_quant)
        return cls(quant_algo=source_quant.quant_algo, group_size=source_quant.group_size,
                   has_zero_point=not source_quant.sym, exclude_modules=("lm_head",),
                   source_quant=source_quant)

    @classmethod
    def create(cls, quant_algo: str | None = None, *, kv_cache_dtype: str | None = None,
               smoothquant_alpha: float | str | None = None, awq_block_size: int | None = None,
               max_ppl_increase: float | None = None, calib_data: str | Path | None = None, calib_size: int = DEFAULT_CALIB_SIZE,
               calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
               calib_batch_size: int = DEFAULT_CALIB_BATCH_SIZE,
               recipe_option: str | None = None) -> "QuantSpec":
        """Build and validate a spec from TensorRT-LLM names (what ``from_args`` calls); each check
        that depends on the format is its recipe's."""
        recipe = recipe_for(quant_algo)
        kv = kv_cache_algo(kv_cache_dtype)
        recipe.check_kv(kv)
        alpha, search = recipe.alpha(smoothquant_alpha, kv)
        if max_ppl_increase is not None and not (max_ppl_increase >= 0 and math.isfinite(max_ppl_increase)):
            raise UserError(f"--max-ppl-increase must be a percentage >= 0, got {max_ppl_increase}")
        group_size = recipe.group_size(awq_block_size)
        for name, value in (("--calib-size", calib_size), ("--calib-seq-len", calib_seq_len),
                            ("--calib-batch-size", calib_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value}")
        spec = cls(
            quant_algo=quant_algo,
            kv_cache_quant_algo=kv,
            group_size=group_size,
            has_zero_point=False,
            pre_quant_scale=recipe.pre_quant_scale,
            exclude_modules=recipe.exclude_modules,  # modelopt (and TensorRT-LLM's plugin SQ converter) may write none
            smoothquant_alpha=alpha,
            sq_alpha_search=search,
            max_ppl_increase=max_ppl_increase,
            calib_data=Path(calib_data) if calib_data is not None else DEFAULT_CALIB_DATA,
            calib_size=calib_size,
            calib_seq_len=calib_seq_len,
            calib_batch_size=calib_batch_size,
            recipe_option=recipe.option(recipe_option),
        )
        calibrated = recipe.calibration(spec) is not None
        if max_ppl_increase is not None and not recipe.gated(spec):
            raise UserError("--max-ppl-increase gates calibrated formats (SmoothQuant, FP8, AWQ, a quantized "
                            "KV cache); drop it or add one")
        if calibrated or calib_data is not None:
            check_calib_file(spec.calib_data)
        return spec

    # ----- what it means: the recipe's answers --------------------------------------------------

    @property
    def format(self) -> Recipe:
        """The format's recipe (quantize/recipes/): every format-dependent answer."""
        if self.source_quant is not None:
            from .recipes.prequantized import prequantized_recipe

            return prequantized_recipe(self.source_quant)
        return recipe_for(self.quant_algo)

    @property
    def is_quantized(self) -> bool:
        return self.format.quantized(self)

    @property
    def is_weight_only(self) -> bool:
        """W8A16/W4A16: the checkpoint carries float weights; trtllm-build quantizes them."""
        return self.format.build_time_quantized

    @property
    def needs_calibration(self) -> bool:
        """True when calibration data must run through the model (SQ, FP8, AWQ, KV cache)."""
        return self.format.calibration(self) is not None

    @property
    def is_sq_plugin(self) -> bool:
        """TensorRT-LLM's own SmoothQuant (forward-hook ranges, quantize/smoothquant.py), not modelopt."""
        return self.format.trtllm_plugin

    @property
    def is_max_calibrated(self) -> bool:
        """modelopt's ``max`` algorithm (FP8, a KV cache alone): running maxima, which the
        layer-wise calibration records with forward hooks (quantize/max_layerwise.py)."""
        return self.format.calibration(self) == MAX

    @property
    def recipe(self) -> str | None:
        """The SmoothQuant recipe in words (None: not SmoothQuant): one name, one numerics contract."""
        return self.format.words(self)

    @property
    def name(self) -> str:
        """Short human name, e.g. 'W4A16_AWQ (group 128) + INT8 KV cache'."""
        return self.format.label(self)

    def read_calib_text(self) -> str:
        """The calibration text (validated non-empty)."""
        return check_calib_file(self.calib_data)

    def modelopt_config(self) -> dict | None:
        """A fresh copy of the ``mtq.quantize`` config for this spec (None: nothing for modelopt to
        calibrate; TensorRT-LLM's SmoothQuant plugin recipe calibrates with forward hooks).

        SQ/FP8/AWQ start from modelopt's INT8_SMOOTHQUANT_CFG / FP8_DEFAULT_CFG / INT4_AWQ_CFG (alpha
        and block size set as requested); a KV-cache dtype appends ``*[kv]_bmm_quantizer`` entries
        (FP8: modelopt's FP8_KV_CFG; INT8: the same with num_bits 8). Weight-only formats with a
        quantized KV cache calibrate the KV cache alone (every other quantizer disabled).
        """
        return self.format.modelopt_config(self)

    def to_trtllm_quantization(self) -> dict:
        """The ``quantization`` block of config.json, with modelopt 0.47's keys, values and order.

        SQ / FP8:  {quant_algo, kv_cache_quant_algo, exclude_modules: ["lm_head"]}
        AWQ:       {quant_algo, kv_cache_quant_algo, group_size, has_zero_point: false,
                    pre_quant_scale: true, exclude_modules: ["lm_head"]}
        KV only / none: {quant_algo: null, kv_cache_quant_algo}   (no exclude_modules, as modelopt)
        W8A16 / W4A16: {quant_algo, kv_cache_quant_algo, exclude_modules: TensorRT-LLM's defaults}
        SQ plugin: TensorRT-LLM's QuantConfig fields, as its convert_checkpoint.py writes them
        """
        return self.format.quantization_block(self)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


#: more control characters than this share of a --calib-data file: it is binary, not text
MAX_CONTROL_FRACTION = 0.05


def check_calib_file(path: str | Path) -> str:
    """Read the calibration text; UserError when it is missing, unreadable or empty."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--calib-data {p} does not exist; give a plain-text file or omit the flag "
                        "to use the shipped calibration text")
    if not p.is_file():
        raise UserError(f"--calib-data {p} is not a file; give a plain-text file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--calib-data {p} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--calib-data {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                        f"offset {e.start}); give a plain-text file") from None
    if not text.strip():
        raise UserError(f"--calib-data {p} is empty; calibration needs some text")
    odd = sum(1 for c in text if not (c.isprintable() or c.isspace()))
    if odd > MAX_CONTROL_FRACTION * len(text):
        raise UserError(f"--calib-data {p} is not text: {100 * odd / len(text):.0f} % of its "
                        f"characters are control characters; give a plain-text file")
    return text


def check_kv_head_duplication(spec: QuantSpec, num_kv_heads: int, tp: int) -> None:
    """SmoothQuant with tp > num_kv_heads: modelopt 0.47 cannot duplicate per-channel k/v scales.

    (``build_qkv`` raises "Duplicating KV heads per-channel scales is not supported".) FP8 (scalar
    scales) and AWQ (2-D group scales) duplicate fine. The recipe's :meth:`Recipe.check_tp`.
    """
    spec.format.check_tp(spec, num_kv_heads, tp)
