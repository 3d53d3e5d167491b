"""The interpreter: a TensorRT-LLM checkpoint's config.json → the parameters every rank's model
declares after ``quantize()`` (name → shape, dtype, the class that declares it).

Names come from the family spec (``model/spec.py``, ``model/families/``); sizes follow TensorRT-LLM's
layer constructors, restated here rather than taken from the converter:

- ``layers/attention.py`` ``Attention``: q heads per rank ``heads // tp``, kv heads per rank
  ``ceil(kv_heads / tp)`` (``(num_kv_heads + tp_size - 1) // tp_size``), head size from
  config.json's ``head_size``; qkv is a ``ColumnLinear`` of ``tp * (q + 2 kv) * head_size``
  outputs, dense a ``RowLinear`` of ``tp * q * head_size`` inputs;
- ``layers/linear.py``: a ColumnLinear holds ``out // tp`` rows, a RowLinear ``in // tp`` columns;
  a RowLinear's bias is whole;
- ``layers/embedding.py`` ``Embedding`` (``use_parallel_embedding``, sharding dim 0):
  ``ceil(vocab / tp)`` rows; ``lm_head`` a ColumnLinear of ``pad_vocab_size(vocab, tp)`` outputs;
- ``mapping.py`` ``Mapping.pp_layers``: contiguous layers per stage, the first stages taking the
  remainder, numbered from 0 on each stage; the embedding on the first stage, ``ln_f`` and
  ``lm_head`` on the last;
- ``layers/moe.py`` ``MixtureOfExperts``: ``experts / moe_ep`` experts per rank, expert
  intermediate ``inter / moe_tp``; fc ``[E, 2 * I, hidden]`` (gated), proj ``[E, hidden, I]``;
  the router a float32 ``RowLinear(hidden, experts)`` with tp 1; ``SharedMoE`` (Qwen2-MoE) adds
  the tp-split ``MLP`` ``shared_expert`` and ``shared_expert_gate``, a ``RowLinear(hidden, 1)``
  with tp 1 in the model dtype.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from model.conditions import LayerConditions
from model.families import FAMILIES
from model.spec import (COLUMN_PARALLEL, DIMS, EXPERT_COLUMN, EXPERT_ROW, QKV, REPLICATED,
                        TRT_LAYER, VOCAB, WHOLE_VOCAB, MlaDims, applies)

from .formats import (DEFAULT_EXCLUDE, KV_ALGOS, ROWWISE_ALWAYS_EXCLUDE, ROWWISE_META_EXCLUDE,
                      SQ_BLOCK, SQ_NORM, flags, scheme_for)
from .model_classes import bias_flags, model_class


class NotModelled(Exception):
    """The checkpoint uses something this table does not restate (one line: what)."""


@dataclass(frozen=True)
class Declared:
    shape: tuple[int, ...]
    dtype: str
    owner: str        # the declaring layer class, for messages
    alt: tuple[int, ...] | None = None  # a second shape accepted (formats.Param.qkv_alt)


@dataclass(frozen=True)
class Layout:
    """The mapping block, as TensorRT-LLM's Mapping reads it."""

    tp: int
    pp: int
    moe_tp: int
    moe_ep: int

    @classmethod
    def of(cls, config: dict) -> "Layout":
        m = config.get("mapping") or {}
        tp, pp = int(m.get("tp_size", 1)), int(m.get("pp_size", 1))
        moe_tp, moe_ep = int(m.get("moe_tp_size", -1)), int(m.get("moe_ep_size", -1))
        if moe_tp == -1 and moe_ep == -1:
            moe_tp, moe_ep = tp, 1
        elif moe_tp == -1:
            moe_tp = tp // moe_ep
        elif moe_ep == -1:
            moe_ep = tp // moe_tp
        return cls(tp, pp, moe_tp, moe_ep)

    @property
    def world(self) -> int:
        return self.tp * self.pp


def pp_layers(layers: int, pp: int, pp_rank: int) -> range:
    base, extra = divmod(layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class ConfigShape(LayerConditions):
    """The sizes a family spec names (model.spec.DIMS), read off a TensorRT-LLM config.json."""

    def __init__(self, config: dict, inter_key: str = "intermediate_size"):
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_size = int(config.get("head_size") or self.hidden // self.heads)
        self.inter = int(config.get(inter_key) or 4 * self.hidden)
        self.vocab = int(config["vocab_size"])
        moe = config.get("moe") or {}
        self.experts = int(moe.get("num_experts", 0))
        self.dtype = config["dtype"]
        self.layers = int(config["num_hidden_layers"])
        self.expert_inter = int(config.get("moe_inter_size") or self.inter)
        # Qwen2-MoE: in the moe block; DeepSeek-V2: its own key
        self.shared_inter = int(moe.get("shared_expert_intermediate_size")
                                or config.get("moe_shared_expert_intermediate_size") or 0)
        self.mla = None
        if config.get("kv_lora_rank"):  # DeepSeekV2Config's MLA sizes
            self.mla = MlaDims(int(config.get("q_lora_rank") or 0), int(config["kv_lora_rank"]),
                               int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"]),
                               int(config["v_head_dim"]))
        # DeepseekV2DecoderLayer: MoE where ``layer_idx > 0`` (layer 0 dense)
        self.first_dense = 1 if self.mla else 0

    def vocab_rank(self, tp: int) -> int:
        """Rows of the parallel embedding / lm_head on one rank: ceil(vocab / tp)."""
        return -(-self.vocab // tp)


def declared_rank(config: dict, rank: int) -> dict[str, Declared]:
    """Every parameter rank ``rank``'s model declares, by name."""
    mc = model_class(config.get("architecture"))
    family = FAMILIES[mc.family]
    q = config.get("quantization") or {}
    scheme = scheme_for(q.get("quant_algo"))
    if scheme is None:
        raise NotModelled(f"quant_algo {q.get('quant_algo')!r} is not in check/formats.py's table")
    kv_params = KV_ALGOS.get(q.get("kv_cache_quant_algo"))
    if kv_params is None:
        raise NotModelled(f"kv_cache_quant_algo {q.get('kv_cache_quant_algo')!r} is not modelled")
    lay, shape = Layout.of(config), ConfigShape(config, mc.inter_key)
    ctx = _Context(config, lay, shape, scheme, q, bias_flags(mc, config))
    pp_rank = rank // lay.tp  # shapes are the same on every tp rank
    out: dict[str, Declared] = {}
    stages = pp_layers(shape_layers(config), lay.pp, pp_rank)
    ctx.stage(pp_rank, len(stages))
    if pp_rank == 0:
        for rule in family.embed:
            ctx.rule(rule, "", out)
    layer = family.layer
    for local in range(len(stages)):
        prefix = TRT_LAYER.format(i=local)
        for rule in layer:
            ctx.rule(rule, prefix, out, family, stages[local])
        ctx.layer_extras(family, prefix, kv_params, out)
    if pp_rank == lay.pp - 1:
        for rule in family.head:
            ctx.rule(rule, "", out)
    return out


def shape_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


class _Context:
    def __init__(self, config, lay: Layout, shape: ConfigShape, scheme, q: dict, biases: dict):
        self.lay, self.shape, self.scheme, self.q, self.biases = lay, shape, scheme, q, biases
        self.dtype = config["dtype"]
        exclude = q.get("exclude_modules")
        self.exclude = tuple(exclude) if exclude else DEFAULT_EXCLUDE
        if scheme.rowwise:  # fp8_rowwise_quantize: null is no pattern, plus its own
            meta = ROWWISE_META_EXCLUDE if q.get("use_meta_recipe") else ()
            self.exclude = (*(exclude or ()), *ROWWISE_ALWAYS_EXCLUDE, *meta)
        self.group = int(q.get("group_size") or 128)
        self.pp_rank, self.stage_layers = 0, 0

    def stage(self, pp_rank: int, layers: int) -> None:
        self.pp_rank, self.stage_layers = pp_rank, layers

    def excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.exclude)

    def replaced(self, block: str) -> bool:
        """fp8_rowwise_quantize: is the MLP / Attention / RmsNorm module ``block`` replaced? Not
        when excluded; with ``use_meta_recipe`` not in the first stage's local layer 0 nor the
        last stage's last local layer (``extract_layer_idx``: the name's first number)."""
        if self.excluded(block):
            return False
        if self.q.get("use_meta_recipe"):
            idx = next((int(p) for p in block.split(".") if p.isdigit()), None)
            if (self.pp_rank == 0 and idx == 0) or (
                    self.pp_rank == self.lay.pp - 1 and idx == self.stage_layers - 1):
                return False
        return True

    # ---- one spec rule --------------------------------------------------------------------
    def rule(self, rule, prefix: str, out: dict, family=None, layer=None) -> None:
        name = rule.target.replace(TRT_LAYER.format(i="{i}"), prefix) if prefix else rule.target
        if rule.when in self.biases:
            if not self.biases[rule.when]:
                return
        elif not applies(rule.when, self.shape, layer):
            return
        if rule.linear is not None:
            lin = family.linear_of_rule(rule)
            self.linear(prefix + lin.name, lin, out, family)
        elif name.rpartition(".")[2] in MLA_PARAMETERS:
            s, tp = self.shape, self.lay.tp
            out[name] = Declared(MLA_PARAMETERS[name.rpartition(".")[2]](s.mla, s, tp),
                                 self.dtype, "DeepseekV2Attention (Parameter)")
        elif rule.shard == VOCAB and name == "lm_head.weight":
            s = self.shape
            self.site("lm_head", "column", s.vocab_rank(self.lay.tp) * self.lay.tp, s.hidden,
                      False, out, quantizable=not (self.scheme.plugin_sq or self.scheme.rowwise))
        elif rule.shard == VOCAB:
            s = self.shape
            dtype = "int8" if self.scheme.embedding and not self.excluded(name[:-7]) else self.dtype
            out[name] = Declared((s.vocab_rank(self.lay.tp), s.hidden), dtype, "Embedding")
        elif rule.shard in (REPLICATED, WHOLE_VOCAB) and name.endswith("vocab_embedding.weight"):
            out[name] = Declared((self.shape.vocab, self.shape.hidden), self.dtype, "Embedding")
        elif rule.dtype == "float32":  # the MoE router: RowLinear(hidden, experts), tp 1, float32
            self.router(name[: -len(".weight")], out)
        elif name.endswith(".shared_expert_gate.weight"):  # SharedMoE: RowLinear(hidden, 1), tp 1
            self.router(name[: -len(".weight")], out, rows=1, float_dtype=None)
        elif not name.endswith(".bias"):  # a norm (Fp8RowwiseRmsNorm: the same weight)
            dims = tuple(DIMS[d](self.shape) for d in rule.shapes[0])
            fp8 = self.scheme.rowwise and self.replaced(name[: -len(".weight")])
            out[name] = Declared(dims, rule.dtype or self.dtype,
                                 "Fp8RowwiseRmsNorm" if fp8 else "RmsNorm")

    def linear(self, module: str, lin, out: dict, family) -> None:
        s, tp = self.shape, self.lay.tp
        if lin.experts:
            return self.experts(module, lin, out)
        if lin.shard == QKV:
            q_heads, kv = s.heads // tp, -(-s.kv_heads // tp)
            full_out, full_in = tp * (q_heads + 2 * kv) * s.head_size, s.hidden
        else:
            full_out = sum(DIMS[o](s) for o, _ in lin.shapes)
            full_in = DIMS[lin.shapes[0][1]](s)
            if lin.shapes[0][1] == "q":  # dense: tp * (heads // tp) * head_size
                full_in = tp * (s.heads // tp) * s.head_size
        kind = "column" if lin.shard in COLUMN_PARALLEL or lin.shard == REPLICATED else "row"
        bias = lin.bias is not None and self.biases.get(lin.bias, False)
        if self.scheme.rowwise and family.qk_norms and lin.shard == QKV and \
                self.replaced(module.rsplit(".", 1)[0]):
            raise NotModelled("Fp8RowwiseAttention (it takes no qk_layernorm) for an attention "
                              "with q/k layernorms")
        self.site(module, kind, full_out, full_in, bias, out, quantizable=True,
                  tp=1 if lin.shard == REPLICATED else None)

    def site(self, module, kind, full_out, full_in, bias, out, *, quantizable, tp=None) -> None:
        """A ColumnLinear / RowLinear with full features, quantized by the scheme unless
        excluded (the SmoothQuant plugin replaces the decoder's linears whatever the list);
        ``tp`` 1: a linear built without tensor parallelism (DeepSeek's fused_a)."""
        scheme, tp = self.scheme, tp or self.lay.tp
        if scheme.rowwise:  # the linears of a replaced MLP / Attention block
            quantized = quantizable and self.replaced(module.rsplit(".", 1)[0])
        else:
            quantized = quantizable and (scheme.plugin_sq or not self.excluded(module))
        params = scheme.linear if quantized else scheme_for(None).linear
        if quantized and scheme.pad:
            m = (max(scheme.pad, self.group) if scheme.groupwise else scheme.pad) * tp
            full_out, full_in = _round_up(full_out, m), _round_up(full_in, m)
        o, i = (full_out // tp, full_in) if kind == "column" else (full_out, full_in // tp)
        owner = scheme.classes if quantized else "Linear / RowLinear"
        self.emit(module, params, o, i, 1, kind == "row", out, owner)
        if bias:
            out[module + ".bias"] = Declared((o,), self.dtype, owner)

    def experts(self, module: str, lin, out: dict) -> None:
        s, lay = self.shape, self.lay
        moe = module.rsplit(".", 1)[0]  # the MixtureOfExperts module: transformer.layers.i.mlp
        quantized = not self.excluded(moe)
        params = self.scheme.experts if quantized else scheme_for(None).experts
        if params is None:
            raise NotModelled(f"{self.scheme.classes} for mixture-of-experts layers")
        e, inter = s.experts // lay.moe_ep, s.expert_inter // lay.moe_tp
        o, i = (2 * inter, s.hidden) if lin.shard == EXPERT_COLUMN else (s.hidden, inter)
        assert lin.shard in (EXPERT_COLUMN, EXPERT_ROW)
        owner = "MOEWeightWrapper" + (f" ({self.scheme.classes})" if quantized else "")
        self.emit(module, params, o, i, e, False, out, owner)

    def router(self, module: str, out: dict, rows: int | None = None,
               float_dtype: str | None = "float32") -> None:
        """A RowLinear(hidden, rows) with tp 1: the MoE router (experts rows, float32) or
        SharedMoE's shared_expert_gate (1 row, the model dtype); in neither quantize_layers'
        map under the plugin nor fp8_rowwise's."""
        quantized = not (self.excluded(module) or self.scheme.plugin_sq or self.scheme.rowwise)
        params = self.scheme.linear if quantized else scheme_for(None).linear
        self.emit(module, params, rows or self.shape.experts, self.shape.hidden, 1, True, out,
                  f"RowLinear ({module.rsplit('.', 1)[1]})", float_dtype=float_dtype)

    def emit(self, module, params, o, i, e, row, out, owner, float_dtype=None) -> None:
        fl = flags(self.scheme, self.q, row)
        sym = {"out": o, "in": i, "E": e, "1": 1, "in/g": i // self.group, "out/4": o // 4,
               "out*b/8": o * self.scheme.bits // 8, "in/2": i // 2, "in/16": i // 16,
               "pad128(out)": _round_up(o, 128), "pad4(in/16)": _round_up(i // 16, 4)}
        for p in params:
            if p.when is not None and p.when not in fl:
                continue
            dtype = (float_dtype or self.dtype) if p.dtype == "dtype" else p.dtype
            alt = p.qkv_alt if p.qkv_alt and module.endswith(".qkv") else None
            out[f"{module}.{p.suffix}"] = Declared(tuple(sym[d] for d in p.dims), dtype, owner,
                                                   tuple(sym[d] for d in alt) if alt else None)

    def layer_extras(self, family, prefix: str, kv_params, out: dict) -> None:
        """The KV-cache scales of each Attention; the SmoothQuant plugin's norm and block scales."""
        attention = prefix + family.attention[1]
        self.emit(attention, kv_params, 1, 1, 1, False, out, "Attention (kv_cache_quantize)")
        if not self.scheme.plugin_sq:
            return
        for rule in family.norms:
            module = rule.target.replace(TRT_LAYER.format(i="{i}"), prefix)[: -len(".weight")]
            self.emit(module, SQ_NORM, 1, 1, 1, False, out, "SmoothQuantRmsNorm")
        for block in (attention, prefix + "mlp"):
            self.emit(block, SQ_BLOCK, 1, 1, 1, False, out, "SmoothQuantAttention / GatedMLP")


#: layers/attention.py DeepseekV2Attention.__init__: its Parameters (not linears, never
#: quantized), per rank: q_b_proj [heads/tp x (nope + rope), q_lora_rank, or hidden without
#: q-LoRA], kv_b_proj [heads/tp x (nope + v), kv_lora_rank], the absorbed fused_q_proj
#: [heads/tp x (kv_lora_rank + rope), q_lora_rank or hidden]
MLA_PARAMETERS = {
    "q_b_proj": lambda m, s, tp: (s.heads // tp * (m.nope + m.rope), m.q_lora or s.hidden),
    "kv_b_proj": lambda m, s, tp: (s.heads // tp * (m.nope + m.v), m.kv_lora),
    "fused_q_proj": lambda m, s, tp: (s.heads // tp * (m.kv_lora + m.rope), m.q_lora or s.hidden),
}


def _round_up(n: int, m: int) -> int:
    return math.ceil(n / m) * m
