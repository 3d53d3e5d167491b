"""Llama, and Mistral and Qwen2 with the same layout (their differences are Shape flags: Qwen2
always has q/k/v bias and no o_proj bias).

TensorRT-LLM naming trap (``tensorrt_llm/models/llama/convert.py``): ``mlp.fc`` is HF ``gate_proj``
(the SiLU branch), ``mlp.gate`` is HF ``up_proj``, ``mlp.proj`` is ``down_proj``.
"""
from __future__ import annotations

from model.spec import (COLUMN, DENSE, QKV, REPLICATED, ROW, VOCAB, ConfigKeys, Family, FromHF, Linear,
                        Rule, norm)

EMBED = (
    Rule("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), VOCAB,
         shapes=(("vocab", "hidden"),)),
)

ATTENTION = (
    Linear("attention.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), QKV,
           (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")), group="qkv",
           norm="input_layernorm", bias="attn_bias"),
    Linear("attention.dense", ("self_attn.o_proj",), DENSE, (("hidden", "q"),), bias="dense_bias"),
)

MLP = (
    Linear("mlp.fc", ("mlp.gate_proj",), COLUMN, (("inter", "hidden"),), group="gate_up",
           norm="post_attention_layernorm", bias="mlp_bias"),
    Linear("mlp.gate", ("mlp.up_proj",), COLUMN, (("inter", "hidden"),), group="gate_up",
           norm="post_attention_layernorm", bias="mlp_bias"),
    Linear("mlp.proj", ("mlp.down_proj",), ROW, (("hidden", "inter"),), bias="mlp_bias"),
)

NORMS = (norm("input_layernorm", "input_layernorm"),
         norm("post_layernorm", "post_attention_layernorm"))

HEAD = (
    Rule("transformer.ln_f.weight", ("model.norm.weight",), REPLICATED, shapes=(("hidden",),),
         rms_norm=True),
    # Always written, also for tied embeddings (TRT-LLM 1.2 expects lm_head.weight).
    Rule("lm_head.weight", ("lm_head.weight",), VOCAB, fallback=("model.embed_tokens.weight",),
         shapes=(("vocab", "hidden"),)),
)

LLAMA = Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), EMBED, ATTENTION + MLP, NORMS,
               HEAD)
#: what TensorRT-LLM's Qwen converter adds to config.json (tensorrt_llm/models/qwen/config.py,
#: QWenConfig.from_hugging_face): the qwen_type its model reads, and HF seq_length or 8192
QWEN_SEQ_LENGTH = ("seq_length", FromHF("seq_length", 8192))
QWEN2 = Family("qwen2", ("Qwen2ForCausalLM",), EMBED, ATTENTION + MLP, NORMS, HEAD,
               flags=(("attn_bias", True), ("dense_bias", False)),
               trtllm_config=ConfigKeys((("qwen_type", "qwen2"), QWEN_SEQ_LENGTH)))
