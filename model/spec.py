"""A model family as one declarative spec: each linear named once, with its rules.

A :class:`Linear` is one TensorRT-LLM linear of a decoder layer: its TensorRT-LLM name
(``attention.qkv``), the HF modules it is made of in fused order (``self_attn.q_proj`` ...), its
fusion group, its shard rule and the HF shape of each source. Norms, embeddings, the head and the
MoE router are plain :class:`Rule` rows. :class:`Family` derives from these the per-tensor rules the
float writer plans from (``rules``), the expected HF shapes, and the queries the recipes, the
unified writer and the verifier ask ("the TensorRT-LLM linear of HF module X", "is it
column-parallel", "which norm feeds it").

Shard rules (implemented by ``convert.shard``):

- ``replicated``: the same tensor on every rank (norms, row-parallel biases)
- ``column``: split dim 0 (output features) — mlp.fc / mlp.gate and their biases
- ``row``: split dim 1 (input features); outputs are summed over ranks — mlp.proj
- ``dense``: ``row`` for attention.dense, with zero input columns for padded heads (--pad-heads)
- ``qkv``: fuse q, k, v per rank: [this rank's q heads; its k heads; its v heads], with kv heads
  duplicated when there are fewer kv heads than ranks, and zero rows for padded heads
- ``vocab``: split dim 0 after padding the vocabulary to a multiple of tp (embedding, lm_head)
- ``expert_column`` / ``expert_row``: ``column`` / ``row`` of one expert over the moe_tp ranks

Quantized companions are placed by rule (:func:`companion_axis`): a tensor that runs along the
weight's output channels follows a column-parallel split and is whole on a row-parallel linear;
one along the input channels (pre-quant scale, smoother) the other way round; a per-block scale
follows the weight's split; a per-tensor scale is replicated.

This module imports nothing of the project: sizes are read off any object with a ``Shape``'s
attributes (``heads``, ``head_size``, ``kv_heads``, ``hidden``, ``inter``, ``vocab``, ``experts``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

REPLICATED, COLUMN, ROW, DENSE, QKV, VOCAB = "replicated", "column", "row", "dense", "qkv", "vocab"
EXPERT_COLUMN, EXPERT_ROW = "expert_column", "expert_row"
#: split the output features (dim 0) / the input features (dim 1) over the tensor-parallel ranks
COLUMN_PARALLEL = frozenset({COLUMN, QKV, VOCAB, EXPERT_COLUMN})
ROW_PARALLEL = frozenset({ROW, DENSE, EXPERT_ROW})

#: sizes a spec names, read off the model's Shape
DIMS = {
    "q": lambda s: s.heads * s.head_size,
    "kv": lambda s: s.kv_heads * s.head_size,
    "hidden": lambda s: s.hidden,
    "inter": lambda s: s.inter,
    "vocab": lambda s: s.vocab,
    "experts": lambda s: s.experts,
    "head": lambda s: s.head_size,
    "shared_inter": lambda s: s.shared_inter,  # a MoE layer's shared expert (Qwen2-MoE)
    "one": lambda s: 1,                         # a gate of one output (shared_expert_gate)
}

#: the sizes as the TensorRT-LLM checkpoint lays them out: heads padded (--pad-heads), the MLP's
#: intermediate features padded as TensorRT-LLM's weight-only / AWQ linears declare them
RANK_DIMS = {
    "q": lambda s: s.tp_heads * s.head_size,
    "kv": lambda s: s.tp_kv_heads * s.head_size,
    "inter": lambda s: getattr(s, "tp_inter", None) or s.inter,
    "hidden": lambda s: getattr(s, "tp_hidden", None) or s.hidden,
}

#: feature dims that zero padding leaves exact: produced only by column-parallel linears and read
#: only by a row-parallel one of the same block (the MLP's intermediate features: fc/gate -> proj),
#: so zero features in every producer and consumer change no output. The hidden features (every
#: linear's input or output, the residual stream) and the attention's q/k/v heads are not.
PADDABLE_DIMS = frozenset({"inter"})

#: feature dims whose zero padding is exact once every RMSNorm over them is rescaled: the hidden
#: features (the residual stream). Zero embedding columns start it at zero, zero output rows of
#: dense / proj keep it there and zero input columns of every reader ignore it; RMSNorm's mean
#: over H' features is (H / H') x the mean over H, so ``norm_epsilon`` x H / H' and each norm
#: weight (``Rule.rms_norm``) x sqrt(H / H') give the same output (quantize.apply.pad_features,
#: convert.plan, ``Family.hidden_padding``).
RESCALED_DIMS = frozenset({"hidden"})

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
        weight = Rule(TRT_LAYER + self.name + ".weight",
                      tuple(HF_LAYER + h + ".weight" for h in self.hf), self.shard,
                      linear=TRT_LAYER + self.name, experts=self.experts, shapes=self.shapes)
        if self.bias is None:
            return (weight,)
        bias = Rule(TRT_LAYER + self.name + ".bias", tuple(HF_LAYER + h + ".bias" for h in self.hf),
                    self.bias_shard, when=self.bias, shapes=tuple((o,) for o, _ in self.shapes))
        return weight, bias


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


@dataclass(frozen=True)
class FromHF:
    """A TensorRT-LLM config.json value read from the HF config: ``getattr(hf, attr, default)``."""

    attr: str
    default: object = None


@dataclass(frozen=True)
class ConfigKeys:
    """A ``Family.trtllm_config`` hook of fixed keys (Qwen: ``qwen_type``): each a value or a
    ``FromHF``, written in this order."""

    keys: tuple[tuple[str, object], ...]

    def __call__(self, hf, shape, tp: int) -> dict:
        return {k: getattr(hf, v.attr, v.default) if isinstance(v, FromHF) else v
                for k, v in self.keys}


#: tensorrt_llm.layers.moe.MoeConfig.ExpertScaleNormalizationMode: NONE (softmax over every
#: expert, then the top-k probabilities as they are) = 0, RENORMALIZE (top-k logits, then softmax
#: over those k: the top-k probabilities divided by their sum) = 1
NORMALIZATION_NONE, NORMALIZATION_RENORMALIZE = 0, 1


#: companion layouts: what axis of the weight a quantization tensor runs along
PER_TENSOR, PER_OUTPUT, PER_INPUT, PER_BLOCK = "tensor", "output", "input", "block"
#: TensorRT-LLM companion suffix -> layout (weights_scaling_factor's depends on its shape)
COMPANIONS = {
    "activation_scaling_factor": PER_TENSOR, "act_scale": PER_TENSOR,
    "prequant_scaling_factor": PER_INPUT, "smoother": PER_INPUT,
    "per_channel_scale": PER_OUTPUT,
}


def companion_layout(kind: str, ndim: int, numel: int) -> str:
    """The layout of a companion tensor ``kind`` (a suffix such as ``weights_scaling_factor``) of
    this many dimensions / elements: one element is per-tensor whatever its name."""
    if numel == 1:
        return PER_TENSOR
    if kind == "weights_scaling_factor":
        return PER_BLOCK if ndim == 2 else PER_OUTPUT  # AWQ [out, in/group]; SQ [out]
    return COMPANIONS[kind]


def companion_axis(shard: str, layout: str) -> int | None:
    """The axis along which a companion of ``layout`` is split for a linear sharded by ``shard``
    (None: replicated). Output-side tensors split where the weight's rows do; input-side ones
    where its columns do; a per-block scale exactly as the weight."""
    column = shard in COLUMN_PARALLEL
    if layout == PER_TENSOR:
        return None
    if layout == PER_BLOCK:
        return 0 if column else 1
    if layout == PER_OUTPUT:
        return 0 if column else None
    if layout == PER_INPUT:
        return None if column else -1
    raise ValueError(f"unknown companion layout {layout!r}")


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
    #: (HF config attribute, value, why): a config TensorRT-LLM 1.2 cannot express for the family,
    #: refused before any work
    unsupported: tuple[tuple[str, object, str], ...] = ()
    #: the (quant_algo, kv_cache_quant_algo) pairs this family is proven for on (engine, pytorch)
    #: target, as TensorRT-LLM names them (None: unquantized); None: every recipe's own rules.
    #: Asked through quantize.recipes' ``family_refusal``, before any work.
    formats: dict | None = None
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

    def linear_of(self, hf_module: str) -> tuple[Linear, int]:
        """(the linear, position in its fused sources) that HF module ``hf_module`` (relative to
        the layer, e.g. ``mlp.gate_proj``) belongs to."""
        for lin in self.linears:
            if hf_module in lin.hf:
                return lin, lin.hf.index(hf_module)
        raise KeyError(f"{self.name} has no linear made of {hf_module!r}")

    def dense_linears(self) -> tuple[Linear, ...]:
        return tuple(lin for lin in self.linears if not lin.experts)

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
                return tuple(DIMS[d](shape) for d in dims)
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
                    pat = re.escape(src).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+")
                    table.append((re.compile(pat + "$"), dims))
        _SHAPE_TABLES[family.name] = table
    return _SHAPE_TABLES[family.name]
