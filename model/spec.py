"""A model family as one declarative spec: each linear named once, with its rules.

A :class:`Linear` is one TensorRT-LLM linear of a decoder layer: its name (``attention.qkv``), the
HF modules it is made of in fused order (``self_attn.q_proj`` ...), its fusion group, shard rule
and the HF shape of each source. Norms, embeddings, the head and the MoE router are :class:`Rule`
rows. :class:`Family` derives the float writer's per-tensor rules (``rules``), the expected HF
shapes, and the queries of the recipes, the unified writer and the verifier.

Shard rules (implemented by ``convert.shard``):

- ``replicated``: the same tensor on every rank (norms, row-parallel biases)
- ``column``: split dim 0 (output features) — mlp.fc / mlp.gate and their biases; several
  sources (a ``FusedPart`` each, Phi-3's mlp.fc): each split, one after the other
- ``row``: split dim 1 (input features); outputs are summed over ranks — mlp.proj
- ``dense``: ``row`` for attention.dense, with zero input columns for padded heads (--pad-heads)
- ``qkv``: fuse q, k, v per rank: [this rank's q heads; its k heads; its v heads], with kv heads
  duplicated when there are fewer kv heads than ranks, and zero rows for padded heads
- ``vocab``: split dim 0 after padding the vocabulary to a multiple of tp (embedding, lm_head)
- ``whole_vocab``: the whole vocabulary on every rank, padded with zero rows as the config's
  ``vocab_size`` is (AWQ's multiple of 64): an embedding without tensor parallelism (Phi-3)
- ``expert_column`` / ``expert_row``: ``column`` / ``row`` of one expert over the moe_tp ranks

Quantized companions are placed by rule (:func:`companion_axis`): output-side tensors follow a
column split and are whole on a row-parallel linear, input-side ones (pre-quant scale, smoother)
the other way round; a per-block scale follows the weight, a per-tensor one is replicated.

Sizes are read off any object with a ``Shape``'s attributes (``heads``, ``head_size``,
``kv_heads``, ``hidden``, ``inter``, ``vocab``, ``experts``); the module imports no project code
but ``model.config_keys``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from model import config_keys
ConfigKeys, FromHF = config_keys.ConfigKeys, config_keys.FromHF  # re-exported: families use them

REPLICATED, COLUMN, ROW, DENSE, QKV, VOCAB = "replicated", "column", "row", "dense", "qkv", "vocab"
EXPERT_COLUMN, EXPERT_ROW = "expert_column", "expert_row"
WHOLE_VOCAB = "whole_vocab"
#: split the output features (dim 0) / the input features (dim 1) over the tensor-parallel ranks
COLUMN_PARALLEL = frozenset({COLUMN, QKV, VOCAB, EXPERT_COLUMN})
ROW_PARALLEL = frozenset({ROW, DENSE, EXPERT_ROW})

# the sizes a spec names and which of them pad exactly: their own module (re-exported here)
from .dims import DIMS, PADDABLE_DIMS, RANK_DIMS, RESCALED_DIMS, MlaDims  # noqa: E402,F401

#: HF layer prefix ({i}: global layer) and TensorRT-LLM layer prefix ({i}: local to the stage)
HF_LAYER = "model.layers.{i}."
TRT_LAYER = "transformer.layers.{i}."


@dataclass(frozen=True)
class Rule:
    """One output tensor: TRT-LLM name <- HF source names, shard rule, condition."""

    target: str
    sources: tuple[str, ...]
    shard: str
    when: str | None = None        # a Shape attribute that must be true (e.g. "attn_bias")
    fallback: tuple[str, ...] = ()  # sources used when the primary ones are absent (tied lm_head)
    linear: str | None = None      # the quantizable linear this weight belongs to (its TRT-LLM prefix)
    experts: bool = False          # one stack over this rank's experts ({e} in sources: expert index)
    dtype: str | None = None       # written in this dtype, not the checkpoint's (MoE router: float32)
    shapes: tuple[tuple[str, ...], ...] = ()  # each source's expected HF shape, in DIMS names
    #: written as ``offset + w`` (added in float32, then cast): a norm whose HF module multiplies
    #: by ``(1 + w)`` (Gemma) while TensorRT-LLM's RmsNorm multiplies by its weight
    offset: float = 0.0
    #: an RMSNorm weight over its dim: when hidden padding applies, it is written times
    #: sqrt(H / H') (RESCALED_DIMS)
    rms_norm: bool = False

    @property
    def split_dim(self) -> str | None:
        """The DIMS name of the features a ``column`` / ``row`` rule splits (None: another rule)."""
        if not self.shapes:
            return None
        if self.shard == COLUMN:
            return self.shapes[0][0]
        if self.shard == ROW and len(self.shapes[0]) > 1:
            return self.shapes[0][1]
        return None


@dataclass(frozen=True)
class FusedPart:
    """Rows of a fused HF tensor (Phi-3's ``qkv_proj`` = [q; k; v]): part ``index`` of ``parts``
    (DIMS names of its row blocks, HF order); shard rules see it as a tensor (convert.plan)."""

    name: str
    parts: tuple[str, ...]
    index: int

    def format(self, **kw) -> "FusedPart":
        return FusedPart(self.name.format(**kw), self.parts, self.index)

    def rows(self, shape) -> tuple[int, int]:
        """(first row, row count) of this part in the fused tensor of a model of ``shape``."""
        sizes = [DIMS[p](shape) for p in self.parts]
        return sum(sizes[:self.index]), sizes[self.index]


def source_name(src) -> str:
    """The HF tensor a rule source reads (a FusedPart's fused tensor)."""
    return src.name if isinstance(src, FusedPart) else src


@dataclass(frozen=True)
class Linear:
    """One TensorRT-LLM linear of a decoder layer and the HF modules it is made of."""

    name: str                       # TensorRT-LLM module in the layer: "attention.qkv"
    hf: tuple[str, ...]             # HF modules in the layer, in fused order ({e}: expert index)
    shard: str                      # the weight's shard rule
    shapes: tuple[tuple[str, str], ...]  # each HF module's (out, in) features, in DIMS names
    group: str | None = None        # fusion group: "qkv", "gate_up", "experts"
    norm: str | None = None         # the HF norm whose output is its input (smoother folding)
    bias: str | None = None         # Shape flag under which the linear has a bias
    experts: bool = False           # a stack over the rank's experts
    #: one fused HF module (``hf``) stacking ``shapes`` on dim 0; the linear takes its parts in
    #: this order (Phi-3's ``gate_up_proj`` [gate; up] -> ``mlp.fc`` [up; gate]: ``(1, 0)``)
    fused: tuple[int, ...] = ()
    when: str | None = None         # a Shape attribute (or per-layer predicate) it exists under

    @property
    def column_parallel(self) -> bool:
        return self.shard in COLUMN_PARALLEL

    @property
    def bias_shard(self) -> str:
        # a row-parallel linear's output is summed over ranks: its bias is added once, whole
        return self.shard if self.column_parallel else REPLICATED

    def rank_features(self, shape, tp: int) -> tuple[int, int]:
        """(output, input) features of this linear on one tensor-parallel rank, with heads padded
        (``shape.tp_heads``): column-parallel splits the output, row-parallel the input; ``qkv``
        splits heads, a rank holding at least one kv head (duplicated when fewer than ranks)."""
        def size(d):
            return RANK_DIMS[d](shape) if d in RANK_DIMS else DIMS[d](shape)

        out = 0
        for o, _ in self.shapes:
            if self.shard == QKV:
                heads = shape.tp_heads // tp if o == "q" else max(shape.tp_kv_heads // tp, 1)
                out += heads * shape.head_size
            else:
                out += size(o) // tp if self.column_parallel else size(o)
        inp = size(self.shapes[0][1])
        return out, inp // tp if self.shard in ROW_PARALLEL else inp

    def rules(self) -> tuple[Rule, ...]:
        """The weight (and bias) rows of this linear."""
        weight = Rule(TRT_LAYER + self.name + ".weight", self._sources("weight"), self.shard,
                      linear=TRT_LAYER + self.name, experts=self.experts,
                      shapes=self._source_shapes(), when=self.when)
        if self.bias is None:
            return (weight,)
        bias = Rule(TRT_LAYER + self.name + ".bias", self._sources("bias"), self.bias_shard,
                    when=self.bias, shapes=tuple((o,) for o, _ in self._source_shapes()))
        return weight, bias

    def _sources(self, kind: str) -> tuple:
        if not self.fused:
            return tuple(HF_LAYER + h + "." + kind for h in self.hf)
        parts = tuple(o for o, _ in self.shapes)
        return tuple(FusedPart(HF_LAYER + self.hf[0] + "." + kind, parts, k) for k in self.fused)

    def _source_shapes(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.shapes[k] for k in self.fused) if self.fused else self.shapes


def norm(trt: str, hf: str, dim: str = "hidden", offset: float = 0.0) -> Rule:
    """A decoder layer's norm: replicated; ``offset``: see ``Rule.offset``."""
    return Rule(TRT_LAYER + trt + ".weight", (HF_LAYER + hf + ".weight",), REPLICATED,
                shapes=((dim,),), offset=offset, rms_norm=True)


def head_norm(trt: str, hf: str, offset: float = 0.0) -> Rule:
    """A norm applied to each attention head (Qwen3's / Gemma 3's ``q_norm``): one weight of
    ``head_size``, shared by every head, so the same on every rank and untouched by head padding;
    ``offset``: see ``Rule.offset``."""
    return norm(trt, hf, dim="head", offset=offset)


#: the epsilon of TensorRT-LLM's per-head q/k norms: ``Attention(eps=1e-05)``'s default
#: (tensorrt_llm/layers/attention.py), which neither the Qwen decoder layer
#: (tensorrt_llm/models/qwen/model.py, QWenDecoderLayer.__init__) nor Gemma 3's
#: (tensorrt_llm/models/gemma/model.py, GemmaDecoderLayer.__init__) overrides, whatever HF's
#: rms_norm_eps
QK_NORM_EPS = 1e-5


# companions: their own module (re-exported here, where the recipes import them from)
from . import companions as _companions  # noqa: E402

COMPANIONS, companion_axis, companion_layout = (_companions.COMPANIONS, _companions.companion_axis,
                                                _companions.companion_layout)
PER_TENSOR, PER_OUTPUT, PER_INPUT, PER_BLOCK = (_companions.PER_TENSOR, _companions.PER_OUTPUT,
                                                _companions.PER_INPUT, _companions.PER_BLOCK)
_COMPANION_COLUMNS = _companions.COLUMN_PARALLEL
from .conditions import applies  # noqa: E402,F401 (re-exported)

assert _COMPANION_COLUMNS == COLUMN_PARALLEL, "model.companions restates the column-parallel rules"

#: tensorrt_llm.layers.moe.MoeConfig.ExpertScaleNormalizationMode: NONE (softmax over every
#: expert, then the top-k probabilities as they are) = 0, RENORMALIZE (top-k logits, then softmax
#: over those k: the top-k probabilities divided by their sum) = 1
NORMALIZATION_NONE, NORMALIZATION_RENORMALIZE = 0, 1


@dataclass(frozen=True)
class Family:
    """A model family: its embedding, decoder layer and head, and the HF architectures it reads."""

    name: str
    architectures: tuple[str, ...]
    embed: tuple[Rule, ...]          # on the first pipeline stage
    linears: tuple[Linear, ...]      # per decoder layer, the quantizable linears
    norms: tuple[Rule, ...]          # per decoder layer, the norms
    head: tuple[Rule, ...]           # on the last pipeline stage
    extra: tuple[Rule, ...] = ()     # per decoder layer, other tensors (MoE router)
    flags: tuple[tuple[str, object], ...] = ()  # Shape fields the family fixes (Qwen2: q/k/v bias)
    #: (HF, TensorRT-LLM) attention module in the layer: where the KV-cache scales live
    attention: tuple[str, str] = ("self_attn", "attention")
    #: per-head norms of q and k (``head_norm``; Qwen3, Gemma 3: ``self_attn.q_norm`` / ``k_norm``
    #: -> ``attention.q_layernorm`` / ``k_layernorm``), applied after the qkv projection and
    #: before RoPE with eps ``QK_NORM_EPS``; never quantized, never a smoother's home (q, k order)
    qk_norms: tuple[Rule, ...] = ()
    #: the family's TensorRT-LLM ``config.json`` keys, ``fields(hf, shape, tp) -> dict`` (fixed
    #: keys: ``ConfigKeys``; computed ones: a function, Gemma), written after the common keys
    #: (convert.hf_config), in the dict's order; None: the common keys only
    trtllm_config: Callable[[object, object, int], dict] | None = None
    #: HF rope types ``trtllm_config`` writes itself (Phi-3: longrope; no common rotary_scaling)
    rope_types: tuple[str, ...] = ()
    #: (HF config attribute, value, why): a config TensorRT-LLM 1.2 cannot express for the family,
    #: refused before any work
    unsupported: tuple[tuple[str, object, str], ...] = ()
    #: the (quant_algo, kv_cache_quant_algo) pairs this family is proven for on (engine, pytorch)
    #: target, as TensorRT-LLM names them (None: unquantized); None: every recipe's own rules.
    #: Asked through quantize.recipes' ``family_refusal``, before any work.
    formats: dict | None = None
    #: target -> why the family cannot be written for that target at all, with the way out
    #: (DeepSeek-V3: no TensorRT engine class); asked before ``formats``
    target_refusals: dict | None = None
    #: (quant_algos, why): formats the family's TensorRT-LLM converter cannot make, refused on
    #: every target with the upstream reason in one clause (checked before ``formats``)
    format_refusals: tuple[tuple[tuple[str, ...], str], ...] = ()
    #: the embedding is a plain nn.Embedding, which modelopt 0.47 wraps with (disabled) quantizers
    #: and so lists in the unified export's exclude_modules; Gemma's scaled-embedding subclass is
    #: not wrapped, hence not listed
    modelopt_embedding: bool = True
    #: quantize.layerwise can run the HF model one decoder layer at a time (it records the layers'
    #: inputs with a plain row lookup for the embedding and applies no final soft-capping);
    #: False: the HF model runs whole (Gemma: scaled embedding, capped logits)
    layerwise: bool = True
    #: why the hidden size cannot be padded exactly (RESCALED_DIMS) for this family, in one
    #: clause; None: it can (every norm over hidden is a ``rms_norm`` rule and nothing else reads
    #: ``hidden_size`` or ``norm_epsilon``)
    hidden_padding: str | None = None
    #: Shape fields the family reads itself, ``shape_fields(hf) -> dict`` (DeepSeek: ``mla``,
    #: the experts' sizes), over the common ones; None: the common ones
    shape_fields: Callable[[object], dict] | None = None
    #: ``rotary(hf) -> (rotary_base, rotary_scaling)`` as the family's TensorRT-LLM converter
    #: writes them (DeepSeek: yarn); None: the common reading (convert.hf_config)
    rotary: Callable[[object], tuple] | None = None
    #: exclude_modules patterns added to a format's list: linears TensorRT-LLM's converter keeps
    #: in float, which its weight-only preprocessing would otherwise not fill (DeepSeek's fused_a)
    unquantized: tuple[str, ...] = ()
    #: a mixture-of-experts family: ``moe(hf) -> dict`` of the ``Shape`` fields it sets (experts,
    #: top_k, moe_normalization, and inter / shared_inter where the experts' widths are their own
    #: config keys), refusing in one line what TensorRT-LLM 1.2 cannot express; None: dense
    moe: Callable[[object], dict] | None = None

    @property
    def layer(self) -> tuple[Rule, ...]:
        """Every per-layer tensor rule: norms, then the linears and the other tensors."""
        out = [self.norms[0]]
        for lin in self.linears:
            out += lin.rules()
            if lin.name == "attention.qkv":
                out += self.qk_norms
            if lin.name == "attention.dense":
                # the post-attention norm (and the MoE router) sit between attention and MLP
                out += self.norms[1:] + self.extra
        return tuple(out)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.embed + self.layer + self.head

    def linear(self, name: str) -> Linear:
        """The linear with TensorRT-LLM name ``name`` (``attention.qkv``)."""
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(f"{self.name} has no linear {name!r}")

    def linear_of_rule(self, rule: Rule) -> Linear:
        """The linear whose weight / bias ``rule`` is (a name may have several linears under
        different conditions: DeepSeek's fused_a, its dense and expert mlp.fc)."""
        return next(lin for lin in self.linears if TRT_LAYER + lin.name == rule.linear
                    and lin.when == rule.when and lin.experts == rule.experts)

    def linear_of(self, hf_module: str) -> tuple[Linear, int]:
        """(the linear, position in its fused sources) that HF module ``hf_module`` (relative to
        the layer, e.g. ``mlp.gate_proj``) belongs to."""
        for lin in self.linears:
            if hf_module in lin.hf:
                return lin, lin.hf.index(hf_module)
        raise KeyError(f"{self.name} has no linear made of {hf_module!r}")

    def dense_linears(self, shape=None) -> tuple[Linear, ...]:
        """The linears that are not expert stacks (with ``shape``: those it has, ``when``)."""
        return tuple(lin for lin in self.linears
                     if not lin.experts and (shape is None or applies(lin.when, shape)))

    def hf_linears(self) -> tuple[str, ...]:
        """HF modules (relative to the layer) of the dense linears, in spec order."""
        return tuple(h for lin in self.dense_linears() for h in lin.hf)

    def fusion_groups(self) -> dict[str, tuple[str, ...]]:
        """Fusion group -> HF modules (dense linears) that share an input, in spec order:
        {"qkv": (q, k, v), "gate_up": (gate, up)}."""
        out: dict[str, tuple[str, ...]] = {}
        for lin in self.dense_linears():
            if lin.group is not None:
                out[lin.group] = out.get(lin.group, ()) + lin.hf
        return out

    def norm_names(self) -> dict[str, str]:
        """HF layer norm -> TensorRT-LLM layer norm (relative to the layer, no ``.weight``; the
        per-head q/k norms: ``qk_norm_names``)."""
        return {_module(r.sources[0], HF_LAYER): _module(r.target, TRT_LAYER) for r in self.norms}

    @property
    def norm_offset(self) -> float:
        """What the TensorRT-LLM checkpoint adds to every HF norm weight (Gemma: 1)."""
        return self.norms[0].offset

    def qk_norm_names(self) -> dict[str, str]:
        """HF -> TensorRT-LLM per-head q/k norm modules (relative to the layer; empty: none)."""
        return {_module(r.sources[0], HF_LAYER): _module(r.target, TRT_LAYER)
                for r in self.qk_norms}

    def input_norm(self, lin: Linear) -> str | None:
        """The TensorRT-LLM norm whose output is ``lin``'s input (None: another linear's output)."""
        return self.norm_names()[lin.norm] if lin.norm is not None else None

    def global_names(self) -> dict[str, str]:
        """HF -> TensorRT-LLM names of the embedding and head tensors."""
        return {r.sources[0]: r.target for r in self.embed + self.head}

    def expected_shape(self, name: str, shape) -> tuple[int, ...] | None:
        """The shape HF tensor ``name`` must have for a model of ``shape`` (None: not checked)."""
        for pattern, dims in _shape_table(self):
            if pattern.match(name):
                return tuple(sum(DIMS[p](shape) for p in d) if isinstance(d, tuple) else DIMS[d](shape)
                             for d in dims)
        return None


def _module(name: str, prefix: str) -> str:
    return name[len(prefix):].removesuffix(".weight")


_SHAPE_TABLES: dict[str, list] = {}


def _shape_table(family: Family) -> list[tuple[re.Pattern, tuple[str, ...]]]:
    """(regex of a source template, its dims) for every source of the family's rules."""
    if family.name not in _SHAPE_TABLES:
        table = []
        for rule in family.rules:
            for names in (rule.sources, rule.fallback):
                for src, dims in zip(names, rule.shapes):
                    if isinstance(src, FusedPart):  # the whole fused tensor: its parts stacked
                        src, dims = src.name, (src.parts, *dims[1:])
                    pat = re.escape(src).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+")
                    table.append((re.compile(pat + "$"), dims))
        _SHAPE_TABLES[family.name] = table
    return _SHAPE_TABLES[family.name]
