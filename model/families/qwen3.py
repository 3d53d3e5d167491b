"""Qwen3 dense (``Qwen3ForCausalLM``): the Llama layout plus a per-head RMSNorm on q and on k
(HF ``self_attn.q_norm`` / ``k_norm``, [head_dim]) -> TensorRT-LLM ``attention.q_layernorm`` /
``attention.k_layernorm``, applied after the qkv projection, before RoPE.

TensorRT-LLM 1.2 (read in its sources, cited in docs/trtllm-format.md):
``tensorrt_llm/models/qwen/config.py`` (``QWenConfig.from_hugging_face``) sends ``qwen3`` to
``QWenForCausalLM`` with ``attn_bias`` false; ``tensorrt_llm/models/qwen/model.py``
(``QWenDecoderLayer``) builds the attention with ``qk_layernorm`` (RmsNorm, the Attention's default
eps) and ``dense_bias`` false; ``tensorrt_llm/models/qwen/convert.py`` (``convert_hf_qwen``) writes
q_norm / k_norm unquantized. HF's ``attention_bias`` (q/k/v and o_proj biases) and sliding-window
layers have no place there, so they are refused.
"""
from __future__ import annotations

from model.spec import ConfigKeys, Family, head_norm

from .llama import ATTENTION, EMBED, HEAD, MLP, NORMS, QWEN_SEQ_LENGTH

QK_NORMS = (head_norm("attention.q_layernorm", "self_attn.q_norm"),
            head_norm("attention.k_layernorm", "self_attn.k_norm"))

QWEN3 = Family(
    "qwen3", ("Qwen3ForCausalLM",), EMBED, ATTENTION + MLP, NORMS, HEAD,
    flags=(("attn_bias", False), ("dense_bias", False)),
    qk_norms=QK_NORMS,
    trtllm_config=ConfigKeys((("qwen_type", "qwen3"), QWEN_SEQ_LENGTH)),
    unsupported=(
        ("attention_bias", True, "TensorRT-LLM 1.2 builds Qwen3 attention without q/k/v and "
                                 "o_proj biases (QWenConfig.from_hugging_face: attn_bias false)"),
        ("use_sliding_window", True, "TensorRT-LLM 1.2's Qwen converter writes no sliding "
                                     "attention window"),
    ))
