"""The interface every quantization format implements, and its defaults (the float format).

A :class:`Recipe` answers every format-dependent question of a build for one ``quant_algo``:

* **flags**: ``flag`` (the weight flag that selects it, ``None`` for float) and
  :meth:`Recipe.resolve_flags` (the final ``quant_algo`` from the parsed flags);
* **validate**: :meth:`check_kv`, :meth:`alpha`, :meth:`group_size`, :meth:`check_tp`
  (UserError, one line, before any work);
* **quantized from the weights alone** (no calibration): :attr:`from_weights`,
  :meth:`quantizes_linear` and :meth:`quantize_weight` (quantize/from_weights.py applies them to
  each rank's float plan);
* **calibration**: :meth:`calibration` (which layer-by-layer method calibrates it:
  :data:`SQ_HOOKS`, :data:`MAX`, :data:`MODELOPT` or None) and :meth:`modelopt_config`;
  :data:`MAX` also reads :attr:`max_linears` and :meth:`kv_cache_bits`;
* **memory estimate**: :attr:`memory` (:class:`MemoryModel`, the coefficients quantize/memory.py
  applies);
* **quantization block**: :meth:`quantization_block` (config.json's ``quantization``),
  :attr:`exclude_modules`, :attr:`pre_quant_scale`;
* **modelopt's export**: :attr:`linear_export` (:class:`LinearExport`: weight codec, num_bits,
  fused groups, tensor suffixes) and :meth:`kv_scale_floor` (quantize/modelopt_state.py);
* **MoE**: :attr:`moe` (quantize/recipes/moe: refusals, exclude_modules, expert tensors);
* **unified checkpoint** (``--target pytorch``, quantize/unified/): :attr:`unified` (a
  :class:`UnifiedFormat`: how modelopt's ``export_hf_checkpoint`` writes the format; None: it has
  no unified form), :meth:`unified_refusal`, :meth:`unified_quantization`;
* **verification**: :attr:`vocab_padding` (verify/compare.py); the reference kernels are
  registered by quant_algo in verify/kernel_table.py's tables;
* **words**: :meth:`label` (``QuantSpec.name``) and :meth:`words` (the recipe in words).

A KV-cache dtype combines with any recipe (an NVFP4 one with FP8 and NVFP4 only); its effects
(calibration, modelopt entries, the label, the unified scheme, the head_dim rule) are handled
here, in the base class, once, from the tables of kv_cache.py. ``spec`` arguments are
:class:`quantize.formats.QuantSpec` objects (duck-typed: recipes import no spec).
"""
from __future__ import annotations

import copy

from common.errors import UserError

from ..algos import KV_CACHE_DTYPES

from .kv_cache import (KV_CACHE_BITS, KV_CACHE_SCHEME, KV_PAIRING_REFUSED, KV_SCALE_FLOOR,
                       UNIFIED_KV_REFUSED, head_refusal, kv_entries)
from .moe import MoeSupport
from .parts import LinearExport, MemoryModel, UnifiedFormat  

#: calibration methods (:meth:`Recipe.calibration`): TensorRT-LLM's SmoothQuant by forward range
#: hooks (quantize/sq_layerwise.py), modelopt's ``max`` by forward hooks (quantize/max_layerwise.py),
#: modelopt's own algorithms per layer (quantize/layerwise.py)
SQ_HOOKS = "sq_hooks"
MAX = "max"
MODELOPT = "modelopt"
def as_list(quant_cfg) -> list:
    if isinstance(quant_cfg, dict):  # older modelopt: {pattern: cfg}
        return [{"quantizer_name": k, **({"cfg": v} if "enable" not in v else v)} for k, v in quant_cfg.items()]
    return list(quant_cfg)


class Recipe:
    """The float format (no weight quantization; a KV cache may still be quantized), and the
    defaults every other recipe overrides where it differs."""

    quant_algo: str | None = None
    flag: str | None = None
    #: TensorRT-LLM's plugin SmoothQuant formats (its own converter's tensors, not modelopt's)
    trtllm_plugin = False
    #: the checkpoint carries float weights; trtllm-build quantizes them (weight-only)
    build_time_quantized = False
    #: config.json's ``exclude_modules`` (None: the key is omitted)
    exclude_modules: tuple[str, ...] | None = None
    pre_quant_scale = False
    #: how the weights calibrate (None: they do not; a KV cache alone is max-calibrated)
    weight_calibration: str | None = None
    #: max calibration records the linears' inputs and weights (FP8) or the KV cache only
    max_linears = False
    #: the checkpoint's vocabulary is padded to a multiple of this (modelopt's AWQ export: 64)
    vocab_multiple = 1
    #: (K, N) multiples of the per-rank input / output features TensorRT-LLM's GEMMs for this
    #: format need (its weight-only kernels); None: no constraint
    gemm_multiples: tuple[int, int] | None = None
    #: the TensorRT-LLM layer class that pads this format's linears (refusal messages)
    padding_layer: str | None = None
    #: k/v heads may be duplicated across ranks when tp > num_kv_heads (False: SmoothQuant's
    #: per-channel k/v scales cannot be)
    kv_duplication = True
    #: modelopt's export of the linears (None: no modelopt-exported linear tensors)
    linear_export: LinearExport | None = None
    memory = MemoryModel()
    moe = MoeSupport()
    #: the unified checkpoint's form (the float one: weights copied; None: no unified form)
    unified: UnifiedFormat | None = UnifiedFormat(from_float_weights=True, moe=True)
    #: the converter quantizes the linears :meth:`quantizes_linear` names from each rank's float
    #: weight with :meth:`quantize_weight` (no calibration; quantize/from_weights.py)
    from_weights = False
    #: a pre-quantized source: ``stage_plans(cplan, spec)`` replaces each rank's planned linears
    #: by tensors cut from the source's own packed ones (quantize/recipes/prequantized)
    stages_from_source = False

    # ----- flags ------------------------------------------------------------------------------

    def resolve_flags(self, args) -> str | None:
        """The final quant_algo from the parsed flags (SmoothQuant's sub-flags pick a variant)."""
        refuse_subflags(args, SQ_SUBFLAGS + AWQ_SUBFLAGS)
        return self.quant_algo

    def flag_option(self, args) -> str | None:
        """The recipe's sub-choice from its flag's value (None: the flag takes none)."""
        return None

    # ----- validation -------------------------------------------------------------------------

    def option(self, value: str | None) -> str | None:
        """Validate ``QuantSpec.recipe_option`` (the recipe's sub-choice)."""
        if value is not None:
            raise UserError(f"{self.flag or 'the float format'} takes no recipe option, got {value!r}")
        return None

    def check_kv(self, kv: str | None) -> None:
        """Refuse a KV-cache quant_algo this format has no TensorRT-LLM recipe with (here: one
        that pairs with a few recipes only, kv_cache.py's ``KV_PAIRING_REFUSED``: an NVFP4 KV
        cache, which the FP8 and NVFP4 recipes accept in their own ``check_kv``)."""
        why = KV_PAIRING_REFUSED.get(kv)
        if why is not None:
            raise UserError(why.format(name=self.flag or "the float format"))

    def alpha(self, value, kv: str | None) -> tuple[float | None, bool]:
        """(SmoothQuant alpha, searched per layer) from the flag's value."""
        if value is not None:
            raise UserError("a SmoothQuant alpha was given without --smoothquant")
        return None, False

    def group_size(self, awq_block_size: int | None) -> int | None:
        """The AWQ group size from --awq-block-size (None: not group-wise)."""
        if awq_block_size is not None:
            raise UserError("--awq-block-size only applies to --awq; add --awq or drop it")
        return None

    def check_tp(self, spec, num_kv_heads: int, tp: int) -> None:
        """Refuse a tensor-parallel split this format's scales cannot follow."""

    def check_linear_shapes(self, spec, in_dims: dict[str, int], out_dims: dict[str, int],
                            unpadded_in: dict[str, int] | None = None) -> None:
        """Refuse per-rank linear shapes this format's kernels cannot take (``in_dims`` /
        ``out_dims``: features per rank by linear; ``unpadded_in``: inputs the calibration sees
        before head padding). Weight-only GEMM multiples here; AWQ adds whole groups."""
        if self.gemm_multiples is None:
            return
        k_multiple, n_multiple = self.gemm_multiples
        checks = [(name, "input", k, k_multiple) for name, k in in_dims.items()]
        checks += [(name, "output", n, n_multiple) for name, n in out_dims.items() if name in in_dims]
        for name, what, n, multiple in checks:
            if n % multiple:
                raise UserError(f"{spec.quant_algo}: {name} has {n} {what} features per rank, not a "
                                f"multiple of {multiple} as TensorRT-LLM's weight-only kernels need; "
                                f"choose another --tp or format")

    def feature_multiple(self, spec) -> int | None:
        """TensorRT-LLM's linears of this format pad their full input and output features to a
        multiple of this times tp (None: they do not pad); see quantize/apply.py pad_features."""
        return None

    def calibration_block(self, spec) -> int:
        """Input features the calibration quantizes in whole blocks (AWQ: the group)."""
        return 1

    def feature_fix(self, spec) -> str:
        """What to do when no tp keeps this format's padding exact (the refusal's last words)."""
        return "choose another format"

    @property
    def vocab_padding(self) -> int:
        """How many padded rows the checkpoint's vocabulary may have beyond the model's."""
        return self.vocab_multiple - 1

    # ----- what it means ----------------------------------------------------------------------

    def quantized(self, spec) -> bool:
        return self.quant_algo is not None or spec.kv_cache_quant_algo is not None

    def calibration(self, spec) -> str | None:
        """The layer-by-layer calibration method (None: nothing to calibrate)."""
        if self.weight_calibration is not None:
            return self.weight_calibration
        return MAX if spec.kv_cache_quant_algo is not None else None

    def gated(self, spec) -> bool:
        """Whether the quality gate measures this build (its tensors are computed here)."""
        return self.from_weights or self.calibration(spec) is not None

    def quantizes_linear(self, spec, layer: int, num_layers: int, linear: str) -> bool:
        """Whether the converter quantizes ``linear`` (spec name, e.g. ``mlp.fc``) of global layer
        ``layer`` from its float weight (:attr:`from_weights` recipes)."""
        return False

    def quantize_weight(self, spec, weight):
        """One rank's float weight [out, in] -> its tensors by suffix (``weight`` first)."""
        raise NotImplementedError(f"{self.quant_algo} is not quantized from the weights alone")

    def calibration_input_sets(self, spec) -> int:
        """Sets of a layer's inputs the calibration store holds (quantize/store.py): one per
        forward-loop pass when the passes' outputs differ (KV quantizers on), else one shared."""
        return self.memory.passes if self.kv_cache_bits(spec) is not None else 1

    def export_linear(self, weight, weight_amax, input_amax) -> dict:
        """One calibrated linear's tensors by suffix, for a ``linear_export.codec`` that
        quantize/modelopt_state.py's ``WEIGHT_CODECS`` does not encode (``weight``: the float
        weight; ``weight_amax`` / ``input_amax``: its fused, sanitised per-tensor maxima)."""
        raise NotImplementedError(f"{self.quant_algo} has no linear export of its own")

    def unified_linear(self, trtllm: dict, weight) -> dict:
        """One linear's unified tensors from its TensorRT-LLM ones and its float ``weight`` in
        the checkpoint dtype, for a ``unified.weight`` that quantize/unified/tensors.py's
        ``ENCODE`` does not encode."""
        raise NotImplementedError(f"{self.quant_algo} has no unified linear of its own")

    def kv_cache_bits(self, spec):
        """modelopt num_bits of the KV cache's quantizers (None: not quantized)."""
        return KV_CACHE_BITS.get(spec.kv_cache_quant_algo)

    def kv_scale_floor(self, spec) -> float | None:
        """The lower bound of the KV cache's exported scales (None: none)."""
        return KV_SCALE_FLOOR.get(spec.kv_cache_quant_algo)

    def modelopt_config(self, spec) -> dict | None:
        """A fresh copy of the ``mtq.quantize`` config (None: nothing for modelopt to calibrate)."""
        if self.calibration(spec) is None:
            return None
        import modelopt.torch.quantization as mtq

        cfg = self._modelopt_weights(spec, mtq)
        cfg["quant_cfg"] = as_list(cfg["quant_cfg"]) + kv_entries(spec.kv_cache_quant_algo)
        return cfg

    def calibration_fingerprint(self, spec) -> str | None:
        """The modelopt config as the calibration store's fingerprint records it (None for the
        max-calibrated recipes: our own hooks, no modelopt import)."""
        return None if self.calibration(spec) == MAX else repr(self.modelopt_config(spec))

    def _modelopt_weights(self, spec, mtq) -> dict:
        """The config's weight part: here every quantizer off (a KV cache alone)."""
        return {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}

    def quantization_block(self, spec) -> dict:
        """config.json's ``quantization`` block, with modelopt 0.47's keys, values and order."""
        q: dict = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": spec.kv_cache_quant_algo}
        q.update(self._block_extras(spec))
        if spec.exclude_modules is not None:
            q["exclude_modules"] = list(spec.exclude_modules)
        return q

    def _block_extras(self, spec) -> dict:
        return {}

    def unified_refusal(self, spec) -> str | None:
        """Why ``--target pytorch`` cannot write ``spec`` (a refusal's text), or None."""
        return UNIFIED_KV_REFUSED.get(spec.kv_cache_quant_algo)

    def family_refusal(self, spec, family, target: str) -> str | None:
        """Why ``family`` (model.spec.Family) cannot be built in ``spec`` on ``target`` ("engine"
        or "pytorch"), asked before any work: here, the family lists the formats it is proven for
        (``Family.formats``); a recipe adds what TensorRT-LLM has no such recipe for (a family
        capability it cannot take: the SmoothQuant plugin and ``qk_norms``)."""
        if target in (family.target_refusals or {}):
            return family.target_refusals[target]
        for algos, why in family.format_refusals:
            if spec.quant_algo in algos:
                return f"{self.flag or spec.name} is not supported for {family.architectures[0]}: {why}"
        proven = None if family.formats is None else family.formats.get(target, ())
        if proven is None or (spec.quant_algo, spec.kv_cache_quant_algo) in proven:
            return None
        names = ", ".join("+".join([str(p[0])] * bool(p[0]) + [f"KV {p[1]}"] * bool(p[1]))
                          or "float" for p in proven)
        if not proven:
            return (f"{family.name} cannot be written for --target {target} yet (no format of "
                    f"it is proven there); use --target "
                    f"{'engine' if target == 'pytorch' else 'pytorch'}")
        return (f"{family.name} with {spec.name} on --target {target} is not supported yet; "
                f"supported: {names}")

    def head_refusal(self, spec, head_size: int) -> str | None:
        """Why the model's ``head_size`` cannot take ``spec``'s KV cache (None: it can): an NVFP4
        KV cache is cut in blocks of 16 along head_dim."""
        return head_refusal(spec.kv_cache_quant_algo, head_size)

    def unified_moe_refusal(self, spec) -> str | None:
        """Why a mixture-of-experts model has no unified checkpoint in ``spec`` (None: it has)."""
        if not self.quantized(spec) or self.unified is not None and self.unified.moe:
            return None
        return (f"--target pytorch with {spec.name} is not supported for mixture-of-experts models "
                f"yet (supported there: FP8, INT8 weight-only, INT4 AWQ, an FP8 KV cache); use "
                f"--target engine or another format")

    def unified_layerwise(self, spec) -> bool:
        """Whether the unified tensors come layer by layer from the calibration store: the
        calibrated formats whose store keeps what the unified form needs
        (quantize/unified/store_entries.py), and a KV cache beside weights that need no
        calibration (its raw k/v amax is kept)."""
        fmt = self.unified
        if fmt is None or self.calibration(spec) is None:
            return False
        return fmt.layerwise or fmt.from_float_weights

    def unified_store_entries(self, spec) -> tuple[bool, bool]:
        """What a calibration store keeps for the unified form (quantize/unified/store_entries.py):
        (per-linear smoothing entries, raw k/v amax); nothing for formats without one."""
        if self.unified is None or self.unified_refusal(spec) is not None:
            return False, False
        return self.unified.fuse_shared_inputs, spec.kv_cache_quant_algo is not None

    def unified_quantization(self, spec) -> dict | None:
        """hf_quant_config.json's ``quantization`` as modelopt 0.47 writes it (None: unquantized)."""
        if not self.quantized(spec):
            return None
        q: dict = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": spec.kv_cache_quant_algo}
        if self.quant_algo is None:  # KV only: process_layer_quant_config's empty per-layer dict
            q["quantized_layers"] = {}
            return q
        q.update(self._block_extras(spec))
        q["exclude_modules"] = ["lm_head", "model.embed_tokens"]  # get_quant_config, sorted
        return q

    def unified_quantization_config(self, spec, hf_quant: dict) -> dict:
        """config.json's ``quantization_config`` of the unified checkpoint (modelopt's
        convert_hf_quant_config_format of ``hf_quant``, hf_quant_config.json)."""
        out: dict = dict(self.unified.quantization_config_extra)
        out["ignore"] = hf_quant["quantization"].get("exclude_modules") or []
        if self.quant_algo:
            out["quant_algo"] = self.quant_algo
        scheme = KV_CACHE_SCHEME.get(spec.kv_cache_quant_algo)
        if scheme is not None:
            out["kv_cache_scheme"] = copy.deepcopy(scheme)
        out["producer"] = hf_quant["producer"]
        out["quant_method"] = "modelopt"
        return out

    def label(self, spec) -> str:
        """Short human name, e.g. 'W4A16_AWQ (group 128) + INT8 KV cache'."""
        parts = [p for p in (self._weight_label(spec),) if p]
        if spec.kv_cache_quant_algo:
            parts.append(f"{spec.kv_cache_quant_algo} KV cache")
        return " + ".join(parts) or "unquantized"

    def _weight_label(self, spec) -> str | None:
        return self.quant_algo

    def words(self, spec) -> str | None:
        """The SmoothQuant recipe in words (None: not SmoothQuant)."""
        return None


#: the sub-flags of one weight flag (args attribute, the flag they apply to)
SQ_SUBFLAGS = (("sq_recipe", "--smoothquant"), ("sq_activations", "--smoothquant"),
               ("sq_weights", "--smoothquant"))
AWQ_SUBFLAGS = (("awq_act", "--awq"),)


def refuse_subflags(args, subflags) -> None:
    """UserError naming the first sub-flag given without the weight flag it applies to."""
    for attr, parent in subflags:
        if getattr(args, attr, None) is not None:
            raise UserError(f"--{attr.replace('_', '-')} applies to {parent}; add it or drop the flag")


def kv_cache_algo(kv_cache_dtype: str | None) -> str | None:
    """The KV cache's quant_algo of ``--kv-cache-dtype`` (None: not quantized)."""
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; choose int8, fp8 "
                        f"or nvfp4")
    return KV_CACHE_DTYPES.get(kv_cache_dtype) if kv_cache_dtype else None
