"""Model families as declarative tables: TRT-LLM name ← HF source names, shard rule, condition.

One row per output tensor. ``{i}`` is the layer index (HF: global; TRT-LLM: local to the pipeline
stage). Shard rules are defined in ``convert.shard``:

- ``replicated``: the same tensor on every rank (norms, row-parallel biases)
- ``column``: split dim 0 (output features) — mlp.fc / mlp.gate and their biases
- ``row``: split dim 1 (input features); outputs are summed over ranks — mlp.proj
- ``dense``: ``row`` for attention.dense, with zero input columns for padded heads (--pad-heads)
- ``qkv``: fuse q, k, v per rank: [this rank's q heads; its k heads; its v heads], with kv heads
  duplicated when there are fewer kv heads than ranks, and zero rows for padded heads
- ``vocab``: split dim 0 after padding the vocabulary to a multiple of tp (embedding, lm_head)

TensorRT-LLM naming trap (``tensorrt_llm/models/llama/convert.py``): ``mlp.fc`` is HF ``gate_proj``
(the SiLU branch), ``mlp.gate`` is HF ``up_proj``, ``mlp.proj`` is ``down_proj``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    target: str
    sources: tuple[str, ...]
    shard: str
    when: str | None = None        # a Shape attribute that must be true (e.g. "attn_bias")
    fallback: tuple[str, ...] = ()  # sources used when the primary ones are absent (tied lm_head)
    linear: str | None = None      # the quantizable linear this weight belongs to (its TRT-LLM prefix)
    experts: bool = False          # one stack over this rank's experts ({e} in sources: expert index)
    dtype: str | None = None       # written in this dtype, not the checkpoint's (MoE router: float32)


_L = "model.layers.{i}."
_T = "transformer.layers.{i}."

_ATTN_QKV = tuple(_L + f"self_attn.{p}_proj" for p in "qkv")

LLAMA_EMBED = (
    Rule("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), "vocab"),
)

LLAMA_LAYER = (
    Rule(_T + "input_layernorm.weight", (_L + "input_layernorm.weight",), "replicated"),
    Rule(_T + "attention.qkv.weight", tuple(s + ".weight" for s in _ATTN_QKV), "qkv",
         linear=_T + "attention.qkv"),
    Rule(_T + "attention.qkv.bias", tuple(s + ".bias" for s in _ATTN_QKV), "qkv", when="attn_bias"),
    Rule(_T + "attention.dense.weight", (_L + "self_attn.o_proj.weight",), "dense",
         linear=_T + "attention.dense"),
    Rule(_T + "attention.dense.bias", (_L + "self_attn.o_proj.bias",), "replicated",
         when="dense_bias"),
    Rule(_T + "post_layernorm.weight", (_L + "post_attention_layernorm.weight",), "replicated"),
    Rule(_T + "mlp.fc.weight", (_L + "mlp.gate_proj.weight",), "column", linear=_T + "mlp.fc"),
    Rule(_T + "mlp.fc.bias", (_L + "mlp.gate_proj.bias",), "column", when="mlp_bias"),
    Rule(_T + "mlp.gate.weight", (_L + "mlp.up_proj.weight",), "column", linear=_T + "mlp.gate"),
    Rule(_T + "mlp.gate.bias", (_L + "mlp.up_proj.bias",), "column", when="mlp_bias"),
    Rule(_T + "mlp.proj.weight", (_L + "mlp.down_proj.weight",), "row", linear=_T + "mlp.proj"),
    Rule(_T + "mlp.proj.bias", (_L + "mlp.down_proj.bias",), "replicated", when="mlp_bias"),
)

LLAMA_HEAD = (
    Rule("transformer.ln_f.weight", ("model.norm.weight",), "replicated"),
    # Always written, also for tied embeddings (TRT-LLM 1.2 expects lm_head.weight).
    Rule("lm_head.weight", ("lm_head.weight",), "vocab", fallback=("model.embed_tokens.weight",)),
)


# Mixtral (tensorrt_llm/models/llama/convert.py, the has_moe_tp() path; docs/trtllm-format.md, MoE):
# attention and norms as Llama; the router unquantized, unsplit, float32; experts stacked over the
# rank's expert-parallel block into [E_local, 2*I/moe_tp, H] with each expert's w3 (up) slice FIRST,
# then w1 (gate; SiLU branch), the inverse of dense Llama's fc/gate naming, and w2 into
# [E_local, H, I/moe_tp].
_M = _L + "block_sparse_moe."
MIXTRAL_LAYER = tuple(r for r in LLAMA_LAYER if ".mlp." not in r.target) + (
    Rule(_T + "mlp.router.weight", (_M + "gate.weight",), "replicated", dtype="float32"),
    Rule(_T + "mlp.fc.weight", (_M + "experts.{e}.w3.weight", _M + "experts.{e}.w1.weight"),
         "expert_column", experts=True, linear=_T + "mlp.fc"),
    Rule(_T + "mlp.proj.weight", (_M + "experts.{e}.w2.weight",), "expert_row", experts=True,
         linear=_T + "mlp.proj"),
)


@dataclass(frozen=True)
class Family:
    name: str
    embed: tuple[Rule, ...]   # on the first pipeline stage
    layer: tuple[Rule, ...]   # per decoder layer
    head: tuple[Rule, ...]    # on the last pipeline stage


# Mistral and Qwen2 share Llama's layout; their differences (q/k/v bias) are Shape flags.
FAMILIES = {
    "llama": Family("llama", LLAMA_EMBED, LLAMA_LAYER, LLAMA_HEAD),
    "qwen2": Family("qwen2", LLAMA_EMBED, LLAMA_LAYER, LLAMA_HEAD),
    "mixtral": Family("mixtral", LLAMA_EMBED, MIXTRAL_LAYER, LLAMA_HEAD),
}
