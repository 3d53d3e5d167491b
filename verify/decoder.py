"""What a decoder layer computes, per TensorRT-LLM model class, read from the checkpoint's
``config.json``: the reference reader's semantics beyond the Llama layer.

TensorRT-LLM picks the model class from ``architecture`` (``MODEL_MAP``); Gemma, Gemma 2 and
Gemma 3 all run ``tensorrt_llm/models/gemma/model.py``'s ``GemmaForCausalLM``, restated here:

- ``GemmaModel.forward``: the embedding times sqrt(hidden_size), the constant in the model dtype;
- ``GemmaDecoderLayer``: GeGLU MLP (``hidden_act`` "gelu" is TensorRT-LLM's tanh approximation);
  with ``inter_layernorms`` the attention output goes through ``post_layernorm`` before the
  residual add, ``pre_feedforward_layernorm`` feeds the MLP and ``post_feedforward_layernorm``
  normalises its output; Gemma 2 / 3 scale q by ``q_scaling = sqrt(query_pre_attn_scalar) /
  sqrt(head_size)`` (scores times ``query_pre_attn_scalar ** -0.5``); Gemma 2 caps the scores
  (``max_attn_value`` = ``attn_logit_softcapping``: ``cap * tanh(s / cap)``); Gemma 3 normalises
  q and k per head (``qk_layernorm``: the family spec's ``qk_norms``, applied by verify/model.py
  as for Qwen3 with eps ``model.spec.QK_NORM_EPS``, the Attention's default, not
  ``norm_epsilon``) and rotates the layers with ``(layer + 1) % _sliding_window_pattern`` != 0
  with ``rope_local_base_freq``;
- the checkpoint's norm weights already hold ``1 + w`` (model/families/gemma.py), so the reader's
  RMSNorm multiplies by the weight as for Llama, in float32 (TensorRT-LLM's RmsNorm) before the
  cast;
- ``final_logit_softcapping``: ``cap * tanh(logits / cap)`` on the float32 logits.

The attention window of each layer is a run-time setting of the engine (``max_attention_window_size``,
one value per layer; builders/triton writes it): :func:`model.families.gemma.trtllm_windows` derives it
from the config as the Triton repository does, and :func:`attend` masks keys older than the window, as a
cyclic KV cache of that size does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import UserError
from model.families.gemma import trtllm_windows

Tensor = torch.Tensor

GEMMA_ARCHITECTURES = frozenset({"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"})
#: model classes whose dense MLP is ``layers/mlp.py`` ``MLP`` with "swiglu": one ``mlp.fc`` whose
#: local output is [up; gate], ``silu(gate) * up`` (``functional.swiglu``; Phi-3)
FUSED_FC_ARCHITECTURES = frozenset({"Phi3ForCausalLM"})
#: hidden_act -> the gated MLP's activation, as TensorRT-LLM's GatedMLP computes it
ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class Semantics:
    """The per-model-class choices of the reader (Llama: every field at its default)."""

    act: object = F.silu
    embed_scale: float | None = None        # multiply the embedding by this (model dtype)
    norm_fp32: bool = False                 # RMSNorm multiplies the weight in float32
    inter_layernorms: bool = False          # Gemma 2/3's four norms per layer
    q_scale: float | None = None            # scores scale (None: head_size ** -0.5)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    windows: tuple = ()                     # per global layer: attention window or None
    local_base: float | None = None         # rotary base of the sliding layers (Gemma 3)
    fused_fc: bool = False                  # MLP "swiglu": mlp.fc holds [up; gate] (Phi-3)

    @classmethod
    def from_config(cls, c: dict, where, moe: bool) -> "Semantics":
        arch = str(c.get("architecture", ""))
        act = c.get("hidden_act", "silu")
        gemma = arch in GEMMA_ARCHITECTURES
        fused = arch in FUSED_FC_ARCHITECTURES and not moe
        allowed = ("gelu", "gelu_pytorch_tanh") if gemma else ("swiglu",) if moe or fused \
            else ("silu",)
        if act not in allowed:
            raise UserError(f"{where}: hidden_act {act!r} is not supported for {arch or 'Llama'} "
                            f"(supported: {', '.join(allowed)})")
        if not gemma:  # Phi-3: every layer's window, where the config carries one
            return cls(fused_fc=fused, windows=tuple(trtllm_windows(c)))
        inter = bool(c.get("inter_layernorms"))
        scalar = c.get("query_pre_attn_scalar") if inter else None
        gemma3 = arch == "Gemma3ForCausalLM"
        windows = tuple(trtllm_windows(c))
        return cls(act=ACTIVATIONS[act], embed_scale=math.sqrt(int(c["hidden_size"])),
                   norm_fp32=True, inter_layernorms=inter,
                   q_scale=float(scalar) ** -0.5 if scalar else None,
                   attn_softcap=c.get("attn_logit_softcapping") if arch == "Gemma2ForCausalLM"
                   else None,
                   final_softcap=c.get("final_logit_softcapping") if inter else None,
                   windows=windows,
                   local_base=float(c["rope_local_base_freq"]) if gemma3 and any(windows) else None)

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def is_local(self, layer: int) -> bool:
        """Rotated with the local base (TensorRT-LLM: ``(layer + 1) % pattern`` != 0)."""
        return self.local_base is not None and self.window(layer) is not None


def rms_norm(x: Tensor, w: Tensor, eps: float, fp32: bool) -> Tensor:
    """RMSNorm over the last dim; ``fp32``: the weight multiplied in float32, then cast (Gemma,
    TensorRT-LLM's RmsNorm), else cast first, then multiplied in x's dtype (Llama, as HF)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if fp32:
        return (xf * w.float()).to(x.dtype)
    return xf.to(x.dtype) * w.to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, sem: Semantics, layer: int) -> Tensor:
    """Causal attention [b, h, s, hd] (k, v already repeated over the q heads): scores scaled
    (``sem.q_scale``), soft-capped, masked to the layer's window, softmax in float32."""
    s = q.shape[2]
    scale = sem.q_scale if sem.q_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if sem.attn_softcap:
        scores = torch.tanh(scores / sem.attn_softcap) * sem.attn_softcap
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    window = sem.window(layer)
    if window is not None:
        mask |= torch.ones(s, s, dtype=torch.bool).tril(-window)  # keys >= window tokens back
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v


def lm_softcap(logits: Tensor, sem: Semantics) -> Tensor:
    if not sem.final_softcap:
        return logits
    cap = float(sem.final_softcap)
    return torch.tanh(logits.float() / cap) * cap
