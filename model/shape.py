"""The numbers that decide how a model can be split: ``Shape`` (from the normalised config), the
exact head padding a tp needs (``--pad-heads``; the padded calibrated tensors are made in quantize.head_padding), the
experts, and the check of a parallel layout against them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from common.errors import UserError

from .conditions import LayerConditions
from .config import SUPPORTED_ARCHITECTURES
from .families import FAMILIES
from .spec import MlaDims

def padded_vocab(vocab: int, tp: int, multiple: int = 1) -> int:
    """``vocab`` rounded up to a multiple of ``tp`` and of ``multiple`` (their lcm)."""
    m = math.lcm(tp, multiple)
    return -(-vocab // m) * m


@dataclass(frozen=True)
class HeadPadding:
    heads: int
    kv_heads: int
    padded_heads: int
    padded_kv_heads: int

    @property
    def active(self) -> bool:
        return self.padded_heads != self.heads

    def count(self, kind: str) -> tuple[int, int]:
        """(real, padded) head count of ``kind`` ("q" or "kv")."""
        return (self.heads, self.padded_heads) if kind == "q" else (self.kv_heads, self.padded_kv_heads)

    @property
    def cost_percent(self) -> int:
        """Extra attention compute (q heads) and KV cache (kv heads): the same ratio, whole groups."""
        return round(100 * (self.padded_heads - self.heads) / self.heads)

    def describe(self) -> str:
        kv = (f", {self.kv_heads} -> {self.padded_kv_heads} KV heads"
              if self.padded_kv_heads != self.kv_heads else "")
        return (f"{self.heads} -> {self.padded_heads} heads{kv} (exact; +{self.cost_percent} % "
                f"attention compute and KV cache)")

    def as_dict(self) -> dict:
        return {"num_attention_heads": [self.heads, self.padded_heads],
                "num_key_value_heads": [self.kv_heads, self.padded_kv_heads],
                "extra_attention_compute_percent": self.cost_percent,
                "extra_kv_cache_percent": self.cost_percent,
                "summary": self.describe()}


def kv_split_ok(kv: int, tp: int) -> bool:
    return (kv >= tp and kv % tp == 0) or (kv < tp and tp % kv == 0)


def choose_padding(heads: int, kv_heads: int, tp: int, *, no_kv_duplication: bool = False
                   ) -> HeadPadding | None:
    """The smallest whole-group padding that tp splits; None when heads and kv heads already split
    (``no_kv_duplication``: also at least tp kv heads, as SmoothQuant needs)."""
    if heads % kv_heads:
        return None  # not a grouped layout this can pad
    group = heads // kv_heads
    for kv in range(kv_heads, kv_heads * tp + 1):
        if (group * kv) % tp == 0 and kv_split_ok(kv, tp) and not (no_kv_duplication and kv < tp):
            return HeadPadding(heads, kv_heads, group * kv, kv)
    return None


@dataclass(frozen=True)
class Shape(LayerConditions):
    """The numbers that decide how a model can be split."""

    family: str
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden: int
    inter: int
    vocab: int
    tied: bool
    attn_bias: bool    # q/k/v biases
    dense_bias: bool   # o_proj bias
    mlp_bias: bool
    vocab_multiple: int = 1  # the padded vocabulary is a multiple of this and of tp (AWQ: 64)
    experts: int = 0         # mixture of experts (convert.moe): experts per layer, 0 = dense MLP
    top_k: int = 0           # experts each token is routed to
    moe_normalization: int = 0  # TensorRT-LLM's ExpertScaleNormalizationMode (Mixtral: 1)
    padding: HeadPadding | None = None  # --pad-heads: zero heads added for tp (convert.shard, quantize.head_padding)
    #: the MLP's intermediate features as TensorRT-LLM's weight-only / AWQ linears declare them
    #: (padded to a multiple of the format's multiple x tp; zero features; quantize.apply)
    padded_inter: int | None = None
    #: the hidden size as the engine checkpoint lays it out, for the same linears, where the
    #: family allows it (model.spec.RESCALED_DIMS; norms rescaled, quantize.apply)
    padded_hidden: int | None = None
    #: the hidden size the calibration runs at when the real one is not a whole number of the
    #: format's input groups (AWQ 128 on 576 -> 640; quantize.calib_padding), None: the real one
    calib_hidden: int | None = None
    #: the calibration runs on the padded heads (``padding``) when the real attention output is
    #: not a whole number of the format's input groups (quantize.calib_padding)
    calib_heads: bool = False
    #: multi-head latent attention (DeepSeek-V2): its ranks and head dims; None: q/k/v heads
    mla: MlaDims | None = None
    moe_inter: int = 0       # each routed expert's intermediate size (0: ``inter``)
    #: a MoE layer's shared expert(s) intermediate size, all of them together (Qwen2-MoE,
    #: DeepSeek), 0: none
    shared_inter: int = 0
    first_dense: int = 0     # with experts: layers below this index have a dense MLP

    @property
    def expert_inter(self) -> int:
        """The routed experts' intermediate size (what --moe-tp splits)."""
        return self.moe_inter or self.inter

    @property
    def tp_heads(self) -> int:
        """q heads as the checkpoint lays them out (padded when ``padding`` is active)."""
        return self.padding.padded_heads if self.padding else self.heads

    @property
    def tp_kv_heads(self) -> int:
        return self.padding.padded_kv_heads if self.padding else self.kv_heads

    @property
    def tp_inter(self) -> int:
        """Intermediate features as the checkpoint lays them out (padded when ``padded_inter``)."""
        return self.padded_inter or self.inter

    @property
    def tp_hidden(self) -> int:
        """Hidden features as the checkpoint lays them out (padded when ``padded_hidden``)."""
        return self.padded_hidden or self.hidden

    @property
    def norm_scale(self) -> float:
        """What every RMSNorm weight over the hidden features is multiplied by (and
        ``norm_epsilon`` by its square) so that the norm over the padded features is the same:
        sqrt(H / H'); 1 unpadded."""
        return math.sqrt(self.hidden / self.tp_hidden)

    @property
    def padded_vocab(self) -> int:
        """Vocabulary size before the tp split (see ``convert.shard.padded_vocab``)."""
        return padded_vocab(self.vocab, 1, self.vocab_multiple)


def model_shape(hf) -> Shape:
    arch = hf.architectures[0]
    family = SUPPORTED_ARCHITECTURES[arch]
    for attr, value, why in FAMILIES[family].unsupported:  # what TensorRT-LLM cannot express
        if getattr(hf, attr, None) == value:
            raise UserError(f"{arch} with {attr} {json.dumps(value)} in config.json is not "
                            f"supported: {why}")
    flags = dict(FAMILIES[family].flags)  # Qwen2: q/k/v bias always, no o_proj bias
    heads = hf.num_attention_heads
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    llama_bias = bool(getattr(hf, "attention_bias", False))
    spec = FAMILIES[family]
    moe = spec.moe(hf) if spec.moe is not None else {}  # experts (model/families/)
    fields = dict(
        family=family,
        layers=hf.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_size=head_size,
        hidden=hf.hidden_size,
        inter=moe.pop("inter", hf.intermediate_size),
        vocab=hf.vocab_size,
        tied=bool(getattr(hf, "tie_word_embeddings", False)),
        attn_bias=flags.get("attn_bias", llama_bias),
        dense_bias=flags.get("dense_bias", llama_bias),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        **moe,
    )
    if FAMILIES[family].shape_fields is not None:  # the family's own sizes (DeepSeek's MLA)
        fields.update(FAMILIES[family].shape_fields(hf))
    return Shape(**fields)


def valid_tp_values(shape: Shape, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if not _tp_problem(shape, t)]


def _tp_problem(shape: Shape, tp: int) -> str | None:
    if shape.tp_heads % tp:
        return f"{shape.tp_heads} attention heads are not divisible by tp {tp}"
    kv = shape.tp_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        return f"{kv} key/value heads cannot be split over tp {tp} (need kv % tp == 0 or tp % kv == 0)"
    if shape.inter % tp and (not shape.experts or shape.first_dense):  # experts: by moe_tp
        return f"intermediate size {shape.inter} is not divisible by tp {tp}"
    if shape.shared_inter % tp:  # the shared expert is a tp-split MLP (layers/moe.py SharedMoE)
        return f"shared expert intermediate size {shape.shared_inter} is not divisible by tp {tp}"
    q_rank, kv_rank = shape.tp_heads // tp, max(kv // tp, 1)
    if FAMILIES[shape.family].qk_norms and q_rank == kv_rank > 1:
        # TensorRT-LLM's Attention.forward (layers/attention.py) views a rank's qkv as
        # [heads, 3, head_size] when q and kv heads are equal, not as its converter's [q; k; v]
        return (f"{q_rank} attention and {kv_rank} KV heads per rank: TensorRT-LLM 1.2's q/k-norm "
                f"attention reads that qkv interleaved per head, not as its converter writes it")
    return None


def preflight(shape: Shape, tp: int, pp: int, *, pad_heads: bool = False,
              no_kv_duplication: bool = False, can_pad: bool = True) -> Shape:
    """Check the parallel layout before any weight is read; one line naming the numbers and the
    fix. Returns ``shape``, with its head padding set when ``pad_heads`` and tp needs it (never
    otherwise: a model whose heads tp divides is not padded). ``no_kv_duplication``: the format
    needs at least tp KV heads (SmoothQuant), which the padding then provides. ``can_pad=False``:
    a target that cannot pad (the refusal does not suggest --pad-heads)."""
    if tp < 1 or pp < 1:
        raise UserError(f"--tp and --pp must be >= 1 (got tp {tp}, pp {pp})")
    problem = _tp_problem(shape, tp)
    padding = None
    if problem:
        padding = choose_padding(shape.heads, shape.kv_heads, tp, no_kv_duplication=no_kv_duplication)
        if padding is not None and (not padding.active or shape.mla is not None
                                    or _tp_problem(_padded(shape, padding), tp)):
            padding = None  # split already, MLA (never padded), or the MLP does not split
    if problem and not (pad_heads and padding):
        valid = ", ".join(map(str, valid_tp_values(shape, max(8, tp))))
        fix = f"; or add --pad-heads to pad {padding.describe()}" if padding and can_pad else ""
        raise UserError(f"cannot split this model over tp {tp}: {problem}; valid --tp values: "
                        f"{valid}{fix}")
    if pp > shape.layers:
        raise UserError(f"--pp {pp} is larger than the model's {shape.layers} layers; "
                        f"use --pp between 1 and {shape.layers}")
    return _padded(shape, padding) if problem else shape


def _padded(shape: Shape, padding: HeadPadding) -> Shape:
    return replace(shape, padding=padding)
