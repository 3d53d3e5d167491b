"""DeepSeek-V2's decoder layer for the CPU reference reader (verify/model.py), with TensorRT-LLM's
semantics, from the converted rank files (model/families/deepseek_v2.py says how they are laid
out):

* multi-head latent attention (``tensorrt_llm/layers/attention.py`` ``DeepseekV2Attention``):
  ``fused_a`` (a linear; weight-only formats list it in ``exclude_modules``) gives [c_q;] c_kv; k_pe,
  ``q_a_layernorm`` / ``kv_a_layernorm`` (RMSNorm, ``norm_epsilon``) normalise c_q and c_kv (V2-Lite
  feeds the normed hidden state itself as c_q); the MLA kernels then use the absorbed
  ``fused_q_proj`` [heads x (kv_lora + rope), q_in] (q's latent part scores against c_kv
  directly) and ``kv_b_proj``'s v rows to expand the context (generation,
  ``applyMLARopeAndAssignQKVKernelGeneration``) or ``q_b_proj`` and ``kv_b_proj``'s k_nope rows
  (context phase): both are computed here (``MlaSpec.path``), and must agree;
* rotary on q_pe / k_pe: adjacent pairs (``apply_rotary_embedding_gptj`` in
  ``cpp/tensorrt_llm/kernels/mlaKernels.cu``) with the yarn table of
  ``RopeEmbeddingUtils.create_sinusoidal_positions_yarn`` (inverse frequencies blended between
  ``1/(factor x base^(2i/d))`` and ``base^(-2i/d)`` over the beta_fast..beta_slow ramp, cos and
  sin times ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``);
* scores times ``1 / (q_scaling x sqrt(nope + rope))`` with ``q_scaling = 1 / mscale(factor,
  mscale_all_dim)^2`` when ``mscale_all_dim`` is set (DeepseekV2Attention.__init__);
* MLP: layer index < ``first_k_dense_replace`` (TensorRT-LLM: layer 0) a dense gated MLP
  (``mlp.fc`` SiLU branch, ``mlp.gate``), else the routed experts (verify/reference_moe.py,
  device-limited routing) plus the shared experts ``mlp.shared_expert.fc`` = [up; gate] (SiLU of
  the second half times the first, as the experts' fc), summed over the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import UserError

from .kernels import linear
from .reference_moe import moe_partial

Tensor = torch.Tensor


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MlaSpec:
    q_lora: int          # 0: V2-Lite (the normed hidden state is c_q)
    kv_lora: int
    nope: int
    rope: int
    v: int
    first_dense: int
    yarn: dict
    base: float
    path: str = "absorbed"   # "absorbed" (fused_q_proj) or "context" (q_b_proj + kv_b_proj)

    @classmethod
    def from_config(cls, c: dict, where) -> "MlaSpec | None":
        if not c.get("kv_lora_rank"):
            return None
        yarn = c.get("rotary_scaling") or {}
        if str(yarn.get("type")) != "yarn":
            raise UserError(f"{where}: an MLA checkpoint needs rotary_scaling of type yarn "
                            "(TensorRT-LLM's DeepseekV2Attention reads it), got "
                            f"{c.get('rotary_scaling')!r}")
        return cls(int(c.get("q_lora_rank") or 0), int(c["kv_lora_rank"]),
                   int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"]), int(c["v_head_dim"]),
                   int(c.get("first_k_dense_replace", 1)), dict(yarn),
                   float(c.get("rotary_base", 10000.0)))

    @property
    def softmax_scale(self) -> float:
        all_dim = float(self.yarn.get("mscale_all_dim") or 0.0)
        q_scaling = 1.0
        if all_dim:
            q_scaling = 1.0 / yarn_mscale(float(self.yarn["factor"]), all_dim) ** 2
        return 1.0 / (q_scaling * math.sqrt(self.nope + self.rope))

    def rotary(self, seq: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [seq, rope/2] of TensorRT-LLM's yarn table, float32 then ``dtype``."""
        y, dim = self.yarn, self.rope
        factor = float(y["factor"])
        pos_freqs = self.base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

        def corr(rot):
            return dim * math.log(float(y["original_max_position_embeddings"])
                                  / (rot * 2 * math.pi)) / (2 * math.log(self.base))

        low = max(math.floor(corr(float(y["beta_fast"]))), 0)
        high = min(math.ceil(corr(float(y["beta_slow"]))), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        inv_freq = inter * (1 - keep) + extra * keep
        angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
        m = yarn_mscale(factor, float(y.get("mscale") or 1.0)) / \
            yarn_mscale(factor, float(y.get("mscale_all_dim") or 0.0))
        return (angles.cos() * m).to(dtype), (angles.sin() * m).to(dtype)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J rotary: each adjacent pair (2i, 2i+1) of x [..., s, rope] turned by angle i."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def _attention_rank(model, p: int, t: int, L: str, h: Tensor, rot) -> Tensor:
    """Rank ``t``'s MLA context [b, s, its heads x v_head_dim] (before attention.dense)."""
    m, q = model.mla, model.qcfg
    x = model._norm(h, model._w(p, t, f"{L}.input_layernorm.weight"))
    a = linear(x, model._lin(p, t, f"{L}.attention.fused_a"), q, f"{L}.attention.fused_a")
    if m.q_lora:
        c_q, c_kv, k_pe = a.split([m.q_lora, m.kv_lora, m.rope], dim=-1)
        c_q = model._norm(c_q, model._w(p, t, f"{L}.attention.q_a_layernorm.weight"))
    else:
        c_kv, k_pe = a.split([m.kv_lora, m.rope], dim=-1)
        c_q = x
    c_kv = model._norm(c_kv, model._w(p, t, f"{L}.attention.kv_a_layernorm.weight"))
    mods = model.ranks[p][t].get(f"{L}.attention", {})

    def param(name):
        if name not in mods:
            raise UserError(f"rank{p * model.tp + t}.safetensors: tensor {L}.attention.{name} "
                            "is missing")
        return mods[name].to(x.dtype)

    b, s, _ = x.shape
    hr = model.q_per_rank
    kv_b = param("kv_b_proj")
    w_k, w_v = kv_b[:hr * m.nope].view(hr, m.nope, m.kv_lora), kv_b[hr * m.nope:].view(hr, m.v, m.kv_lora)
    cos, sin = rot
    k_pe = rotate_pairs(k_pe, cos, sin)                                   # [b, s, rope]
    if m.path == "absorbed":
        qa = (c_q @ param("fused_q_proj").t()).view(b, s, hr, m.kv_lora + m.rope).transpose(1, 2)
        q_lat, q_pe = qa.split([m.kv_lora, m.rope], dim=-1)
        scores = q_lat @ c_kv.unsqueeze(1).transpose(-1, -2)            # against the latent
    else:
        qc = (c_q @ param("q_b_proj").t()).view(b, s, hr, m.nope + m.rope).transpose(1, 2)
        q_nope, q_pe = qc.split([m.nope, m.rope], dim=-1)
        k_nope = torch.einsum("bsk,hdk->bhsd", c_kv, w_k)
        scores = q_nope @ k_nope.transpose(-1, -2)
    q_pe = rotate_pairs(q_pe, cos, sin)
    scores = (scores + q_pe @ k_pe.unsqueeze(1).transpose(-1, -2)).float() * m.softmax_scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(x.dtype)                  # [b, hr, s, s]
    if m.path == "absorbed":
        ctx = torch.einsum("bhsk,hvk->bshv", probs @ c_kv.unsqueeze(1), w_v)
    else:
        ctx = (probs @ torch.einsum("bsk,hvk->bhsv", c_kv, w_v)).transpose(1, 2)
    return ctx.reshape(b, s, hr * m.v)


def _gated(x: Tensor, fused: Tensor) -> Tensor:
    up, gate = fused.chunk(2, dim=-1)      # [up; gate] rows: swiglu = silu(gate) * up
    return F.silu(gate) * up


def _mlp(model, p: int, layer: int, L: str, hs: list[Tensor]) -> list[Tensor]:
    """Dense gated MLP before ``first_k_dense_replace``, else routed + shared experts."""
    q = model.qcfg
    xs = [model._norm(hs[t], model._w(p, t, f"{L}.post_layernorm.weight")) for t in range(model.tp)]
    if layer < model.mla.first_dense:
        mids = [F.silu(linear(x, model._lin(p, t, f"{L}.mlp.fc"), q, f"{L}.mlp.fc"))
                * linear(x, model._lin(p, t, f"{L}.mlp.gate"), q, f"{L}.mlp.gate")
                for t, x in enumerate(xs)]
        out = model._row_parallel(p, f"{L}.mlp.proj", mids)
        return [hs[t] + out[t] for t in range(model.tp)]
    total = None
    for t, x in enumerate(xs):
        mods = {k: model._mod(p, t, f"{L}.mlp.{k}") for k in ("router", "fc", "proj")}
        y = moe_partial(x, mods, model.moe, t, linear, q, f"{L}.mlp")
        if model.ranks[p][t].get(f"{L}.mlp.shared_expert.fc") is not None:
            mid = _gated(x, linear(x, model._lin(p, t, f"{L}.mlp.shared_expert.fc"), q,
                                   f"{L}.mlp.shared_expert.fc"))
            y = y + linear(mid, model._lin(p, t, f"{L}.mlp.shared_expert.proj"), q,
                           f"{L}.mlp.shared_expert.proj", add_bias=False)
        total = y if total is None else total + y                       # all-reduce
    return [hs[t] + total for t in range(model.tp)]


def mla_layer(model, p: int, i: int, hs: list[Tensor], seq_rot) -> list[Tensor]:
    """One DeepSeek-V2 decoder layer (local index ``i`` of stage ``p``) on every tp rank."""
    L = f"transformer.layers.{i}"
    ctx = [_attention_rank(model, p, t, L, hs[t], seq_rot) for t in range(model.tp)]
    dense = model._row_parallel(p, f"{L}.attention.dense", ctx)
    hs = [hs[t] + dense[t] for t in range(model.tp)]
    return _mlp(model, p, model.stage_layers[p][i], L, hs)
