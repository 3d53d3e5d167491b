"""CPU reference reader for TensorRT-LLM checkpoints: run ``config.json`` + ``rank{r}.safetensors``
with TensorRT-LLM's semantics and compare the logits with the Hugging Face model.

Every rank's shard is run separately and the ranks are combined exactly as tensor / pipeline
parallelism combines them on GPUs:

* column-parallel linears (``attention.qkv``, ``mlp.fc``, ``mlp.gate``, ``lm_head``): each tp rank
  computes its own output slice (attention runs per rank over its own heads; ``lm_head`` slices are
  all-gathered, then cropped to the unpadded ``vocab_size``);
* row-parallel linears (``attention.dense``, ``mlp.proj``): each tp rank multiplies its input
  slice, the partial results are summed (all-reduce), and the bias is added once after the sum;
* parallel embedding (``use_parallel_embedding``, ``embedding_sharding_dim`` 0): each tp rank looks
  up the rows it holds (zeros for ids outside its range), the lookups are summed; sharding dim 1:
  each rank looks up its hidden-dim slice, the slices are concatenated;
* replicated tensors (norms, row-parallel biases) are read from every rank's own copy: each tp rank
  keeps its own hidden state, as on a GPU, so copies that differ between ranks show up in the logits;
* pipeline parallel: rank = pp_rank * tp + tp_rank; each pp stage holds its layers numbered from 0
  (``torch.tensor_split`` split: the first stages get the extra layer); the embedding lives on the
  first stage, ``ln_f`` and ``lm_head`` on the last; tp rank r of stage p hands its hidden state to
  tp rank r of stage p + 1.

Model: Llama-family decoder (Llama, Mistral, Qwen2; Mixtral's mixture of experts in
``verify/reference_moe.py``): RMSNorm, GPT-NeoX rotary (``rotate_half``)
with optional ``rotary_scaling`` (``llama3`` and ``linear``, computed as transformers does),
causal grouped-query attention, SiLU-gated MLP ``proj(silu(fc(x)) * gate(x))``. Note the names:
``mlp.fc`` is HF ``gate_proj`` (the SiLU branch) and ``mlp.gate`` is HF ``up_proj``.

Quantized formats plug in as small functions: see ``LINEAR_KERNELS`` / ``register_linear`` and
``KV_CACHE_KERNELS`` / ``register_kv_cache``. The unquantized kernels live here; the quantized ones
(SmoothQuant, FP8, AWQ, weight-only INT8/INT4, INT8/FP8 KV cache) in ``verify/reference_quant.py``,
registered when this module is imported.

Command line::

    python -m verify.reference CKPT_DIR --hf HF_DIR [--text "..."]

prints one line; exit 0 when the logits match, 1 on a mismatch, 2 on bad input.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from convert.errors import UserError

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint(ckpt_dir) -> tuple[dict, list[dict[str, Tensor]]]:
    """Read ``config.json`` and every ``rank{r}.safetensors`` (r < mapping.world_size)."""
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    if not d.is_dir():
        raise UserError(f"checkpoint directory {d} does not exist (expected config.json + rank*.safetensors)")
    from .unified_reader import is_unified_checkpoint, load_unified  # modelopt unified HF checkpoint

    if is_unified_checkpoint(d):
        return load_unified(d)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing: {d} is not a TensorRT-LLM checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} must hold a JSON object")
    tp, pp = _mapping(config, cfg_path)
    ranks = []
    for r in range(tp * pp):
        p = d / f"rank{r}.safetensors"
        if not p.is_file():
            raise UserError(f"{p} is missing: mapping says world_size {tp * pp} (tp {tp} x pp {pp})")
        try:
            ranks.append(load_file(p))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise UserError(f"cannot read {p}: {e}") from None
    return config, ranks


def _mapping(config: dict, where="config.json") -> tuple[int, int]:
    m = config.get("mapping") or {}
    try:
        tp = int(m.get("tp_size", 1))
        pp = int(m.get("pp_size", 1))
        world = int(m.get("world_size", tp * pp))
    except (TypeError, ValueError):
        raise UserError(f"{where}: mapping must hold integer tp_size/pp_size/world_size, got {m!r}") from None
    if tp < 1 or pp < 1 or world != tp * pp:
        raise UserError(f"{where}: mapping world_size {world} != tp_size {tp} x pp_size {pp}")
    return tp, pp


# --------------------------------------------------------------------------------------------
# Quantization dispatch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint's ``quantization`` section, as the kernels need it."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: tuple[str, ...] | None = None
    dtype: str | None = None  # the checkpoint's dtype: TensorRT-LLM casts some scales to it
    raw: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, config: dict) -> "QuantSpec":
        q = config.get("quantization") or {}
        excl = q.get("exclude_modules")
        return cls(
            quant_algo=q.get("quant_algo"),
            kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
            group_size=q.get("group_size"),
            has_zero_point=bool(q.get("has_zero_point", False)),
            pre_quant_scale=bool(q.get("pre_quant_scale", False)),
            exclude_modules=tuple(excl) if excl is not None else None,
            dtype=config.get("dtype"),
            raw=dict(q),
        )

    def algo_for(self, module: str) -> str | None:
        """quant_algo that applies to ``module`` (e.g. 'transformer.layers.0.mlp.fc'); None: unquantized.

        Like TensorRT-LLM, a module matching ``exclude_modules`` (fnmatch patterns, also tried with a
        leading '*') stays unquantized; without the list, lm_head is never quantized.
        """
        if self.quant_algo is None:
            return None
        patterns = self.exclude_modules if self.exclude_modules is not None else ("*lm_head",)
        for pat in patterns:
            if fnmatch.fnmatchcase(module, pat) or fnmatch.fnmatchcase(module, "*" + pat):
                return None
        return self.quant_algo


# A linear kernel: y = x @ W^T for one module of one rank, WITHOUT bias (the caller adds it: per rank
# for column-parallel, once after the sum for row-parallel). ``params`` holds that module's tensors
# by suffix ('weight', 'weights_scaling_factor', 'prequant_scaling_factor', ...); ``x`` is in the
# compute dtype and so must be the result.
LinearKernel = Callable[[Tensor, Mapping[str, Tensor], QuantSpec], Tensor]
LINEAR_KERNELS: dict[str | None, LinearKernel] = {}

# A KV-cache kernel: (k, v, attention-module params, spec) -> (k, v) as the attention reads them back
# from the cache (e.g. quantize-dequantize with kv_cache_scaling_factor). k, v: [batch, kv_heads, seq, hd].
KVCacheKernel = Callable[[Tensor, Tensor, Mapping[str, Tensor], QuantSpec], tuple[Tensor, Tensor]]
KV_CACHE_KERNELS: dict[str | None, KVCacheKernel] = {}


def register_linear(*algos: str | None):
    """Decorator: ``@register_linear("FP8")`` adds a linear kernel for those quant_algo values."""

    def deco(fn: LinearKernel) -> LinearKernel:
        for a in algos:
            LINEAR_KERNELS[a] = fn
        return fn

    return deco


def register_kv_cache(*algos: str | None):
    """Decorator: ``@register_kv_cache("FP8")`` adds a KV-cache kernel for those kv_cache_quant_algo values."""

    def deco(fn: KVCacheKernel) -> KVCacheKernel:
        for a in algos:
            KV_CACHE_KERNELS[a] = fn
        return fn

    return deco


def _require(params: Mapping[str, Tensor], key: str, what: str = "") -> Tensor:
    t = params.get(key)
    if t is None:
        raise UserError(f"tensor {what + '.' if what else ''}{key} is missing from the checkpoint")
    return t


@register_linear(None)
def _linear_unquantized(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec) -> Tensor:
    w = _require(params, "weight")
    if not w.is_floating_point():
        raise UserError(f"unquantized checkpoint holds a {w.dtype} weight; quantization.quant_algo is null "
                        "but the weights look quantized")
    return x @ w.to(x.dtype).t()


@register_kv_cache(None)
def _kv_cache_plain(k: Tensor, v: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec):
    return k, v


from . import reference_quant  # noqa: E402,F401  (registers the quantized kernels)
from .reference_moe import MoeSpec, moe_partial  # noqa: E402


def linear(x: Tensor, params: Mapping[str, Tensor], qcfg: QuantSpec, module: str = "",
           add_bias: bool = True) -> Tensor:
    """One rank's linear layer: dispatch on the quant_algo that applies to ``module``."""
    algo = qcfg.algo_for(module)
    kernel = LINEAR_KERNELS.get(algo)
    if kernel is None:
        raise UserError(f"quant_algo {algo} is not supported by the reference reader yet "
                        f"(supported: {_names(LINEAR_KERNELS)})")
    try:
        y = kernel(x, params, qcfg)
    except UserError as e:
        raise UserError(f"{module}: {e}") from None
    if add_bias and "bias" in params:
        y = y + params["bias"].to(y.dtype)
    return y


def _names(table) -> str:
    return ", ".join("null" if k is None else str(k) for k in table)


# --------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------


def rotary_inv_freq(rot_dim: int, base: float, scaling: dict | None) -> Tensor:
    """Inverse frequencies [rot_dim/2] as transformers computes them (default, linear, llama3)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float) / rot_dim))
    if not scaling:
        return inv_freq
    if not isinstance(scaling, dict):
        raise UserError(f"config.json: rotary_scaling must be an object, got {scaling!r}")
    # TensorRT-LLM reads the kind from "type", falling back to HF's "rope_type".
    kind = str(scaling.get("type", scaling.get("rope_type")) or "none").lower()
    if kind in ("none", "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling.get("factor", 1.0))
    if kind == "llama3":
        # Defaults are TensorRT-LLM's (and Meta's original): 8, 1, 4, 8192.
        factor = float(scaling.get("factor", 8.0))
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context_len = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise UserError(f"rotary_scaling type {kind!r} is not supported by the reference reader "
                    "(supported: linear, llama3; dynamic NTK and others are not implemented)")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX rotary on the first cos.shape[-1] dims of x [b, h, s, hd]."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")


def _index(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{'transformer.layers.0.attention.qkv': {'weight': t, 'bias': t}, ...}"""
    out: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        out.setdefault(prefix, {})[suffix] = t
    return out


def pp_layers(num_layers: int, pp_size: int, pp_rank: int, partition=None) -> list[int]:
    """Global layer indices of pipeline stage ``pp_rank`` (TensorRT-LLM's Mapping.pp_layers)."""
    if partition:
        start = sum(partition[:pp_rank])
        return list(range(start, start + partition[pp_rank]))
    return torch.tensor_split(torch.arange(num_layers), pp_size)[pp_rank].tolist()


class ReferenceModel:
    """A TensorRT-LLM checkpoint run on CPU rank by rank; ``forward(ids) -> float32 logits``."""

    def __init__(self, ckpt_dir, compute_dtype: torch.dtype | None = None):
        self.ckpt_dir = Path(ckpt_dir)
        self.config, ranks = load_checkpoint(ckpt_dir)
        self.compute_dtype = compute_dtype or torch.float32
        c = self.config
        where = self.ckpt_dir / "config.json"
        self.tp, self.pp = _mapping(c, where)
        self.qcfg = QuantSpec.from_config(c)

        def need(key):
            if key not in c:
                raise UserError(f"{where}: field {key!r} is missing")
            return c[key]

        arch = str(c.get("architecture", ""))
        self.num_layers = int(need("num_hidden_layers"))
        self.hidden = int(need("hidden_size"))
        self.heads = int(need("num_attention_heads"))
        self.kv_heads = int(c.get("num_key_value_heads") or self.heads)
        self.head_size = int(c.get("head_size") or self.hidden // self.heads)
        self.vocab_size = int(need("vocab_size"))
        self.eps = float(c.get("norm_epsilon", 1e-5))
        pe = c.get("position_embedding_type", "rope_gpt_neox")
        if pe != "rope_gpt_neox":
            raise UserError(f"{where}: position_embedding_type {pe!r} is not supported (rope_gpt_neox only)")
        self.moe = MoeSpec.from_config(c, self.tp, where)  # None: dense MLP
        act = c.get("hidden_act", "silu")
        if act != ("swiglu" if self.moe else "silu"):
            raise UserError(f"{where}: hidden_act {act!r} is not supported (silu only, {arch or 'Llama'} family; "
                            f"swiglu for mixture-of-experts)")
        if c.get("residual_mlp"):
            raise UserError(f"{where}: residual_mlp is not supported by the reference reader")
        if self.heads % self.tp:
            raise UserError(f"{where}: num_attention_heads {self.heads} is not divisible by tp_size {self.tp}")
        if self.kv_heads % self.tp and self.tp % self.kv_heads:
            raise UserError(f"{where}: num_key_value_heads {self.kv_heads} and tp_size {self.tp}: "
                            "neither divides the other")
        self.q_per_rank = self.heads // self.tp
        self.kv_per_rank = max(1, self.kv_heads // self.tp)
        if self.q_per_rank % self.kv_per_rank:
            raise UserError(f"{where}: {self.q_per_rank} q heads per rank do not group over {self.kv_per_rank} kv heads")

        # Rotary tables' frequencies, fp32 as in transformers.
        self.rot_dim = int(self.head_size * float(c.get("rotary_pct", 1.0)))
        if c.get("rotary_dim"):
            self.rot_dim = int(c["rotary_dim"])
        self.inv_freq = rotary_inv_freq(self.rot_dim, float(c.get("rotary_base", 10000.0)), c.get("rotary_scaling"))

        # Quantization: fail now, before any compute, for a format that has no kernel.
        if self.qcfg.quant_algo not in LINEAR_KERNELS:
            raise UserError(f"quant_algo {self.qcfg.quant_algo} is not supported by the reference reader yet "
                            f"(supported: {_names(LINEAR_KERNELS)})")
        if self.qcfg.kv_cache_quant_algo not in KV_CACHE_KERNELS:
            raise UserError(f"kv_cache_quant_algo {self.qcfg.kv_cache_quant_algo} is not supported by the "
                            f"reference reader yet (supported: {_names(KV_CACHE_KERNELS)})")

        self.use_parallel_embedding = bool(c.get("use_parallel_embedding", False))
        self.embedding_sharding_dim = int(c.get("embedding_sharding_dim", 0))

        # ranks[pp][tp] -> {module prefix: {suffix: tensor}}
        self.ranks = [[_index(ranks[p * self.tp + t]) for t in range(self.tp)] for p in range(self.pp)]
        partition = (c.get("mapping") or {}).get("pp_partition")
        if partition and (len(partition) != self.pp or sum(partition) != self.num_layers):
            raise UserError(f"{where}: mapping.pp_partition {partition} does not split {self.num_layers} layers "
                            f"over pp_size {self.pp}")
        self.stage_layers = [pp_layers(self.num_layers, self.pp, p, partition) for p in range(self.pp)]
        for p in range(self.pp):
            for t in range(self.tp):
                r = p * self.tp + t
                have = sorted({int(m.group(1)) for n in ranks[r] if (m := _LAYER_RE.match(n))})
                want = list(range(len(self.stage_layers[p])))
                if have != want:
                    raise UserError(
                        f"rank{r}.safetensors (pp rank {p}) holds layers {have}, expected local indices "
                        f"{want} (HF layers {self.stage_layers[p]}; layer numbering restarts at 0 on every pp rank)")

    # ---- helpers -----------------------------------------------------------------------------

    def _mod(self, p: int, t: int, name: str) -> dict[str, Tensor]:
        m = self.ranks[p][t].get(name)
        if m is None:
            raise UserError(f"rank{p * self.tp + t}.safetensors: tensors {name}.* are missing")
        return m

    def _w(self, p: int, t: int, name: str) -> Tensor:
        m = self._mod(p, t, name.rpartition(".")[0])
        key = name.rpartition(".")[2]
        if key not in m:
            raise UserError(f"rank{p * self.tp + t}.safetensors: tensor {name} is missing")
        return m[key]

    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf.to(x.dtype)) * w.to(x.dtype)

    # ---- forward -----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits float32 [batch, seq, vocab_size] for ``input_ids`` [batch, seq] (positions 0..seq-1)."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise UserError(f"input_ids must be an integer tensor [batch, seq], got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise UserError(f"input_ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        seq = ids.shape[1]

        pos = torch.arange(seq, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.compute_dtype), emb.sin().to(self.compute_dtype)

        hs = self._embed(ids)                     # one hidden state per tp rank
        for p in range(self.pp):
            for i in range(len(self.stage_layers[p])):
                hs = self._layer(p, i, hs, cos, sin)
            # send/recv: tp rank t of stage p -> tp rank t of stage p+1 (the list carries over as is)
        return self._logits(hs).float()

    __call__ = forward

    def _embed(self, ids: Tensor) -> list[Tensor]:
        dt = self.compute_dtype
        tabs = [self._w(0, t, "transformer.vocab_embedding.weight") for t in range(self.tp)]
        if not self.use_parallel_embedding or self.tp == 1:
            return [F.embedding(ids, w.to(dt)) for w in tabs]
        if self.embedding_sharding_dim == 0:
            rows = tabs[0].shape[0]
            if rows * self.tp < self.vocab_size:
                raise UserError(f"vocab_embedding holds {rows} rows per rank x tp {self.tp} < vocab_size {self.vocab_size}")
            total = None
            for t, w in enumerate(tabs):
                local = ids - t * rows
                hit = (local >= 0) & (local < w.shape[0])
                part = F.embedding(local.clamp(0, w.shape[0] - 1), w.to(dt)) * hit.unsqueeze(-1).to(dt)
                total = part if total is None else total + part      # all-reduce
            return [total] * self.tp
        if self.embedding_sharding_dim == 1:
            full = torch.cat([F.embedding(ids, w.to(dt)) for w in tabs], dim=-1)  # all-gather
            return [full] * self.tp
        raise UserError(f"embedding_sharding_dim {self.embedding_sharding_dim} is not 0 or 1")

    def _row_parallel(self, p: int, name: str, xs: list[Tensor]) -> list[Tensor]:
        """Sum of every rank's partial product, then each rank adds its own copy of the bias."""
        total = None
        for t in range(self.tp):
            y = linear(xs[t], self._mod(p, t, name), self.qcfg, name, add_bias=False)
            total = y if total is None else total + y            # all-reduce
        outs = []
        for t in range(self.tp):
            b = self._mod(p, t, name).get("bias")
            outs.append(total if b is None else total + b.to(total.dtype))
        return outs

    def _layer(self, p: int, i: int, hs: list[Tensor], cos: Tensor, sin: Tensor) -> list[Tensor]:
        L = f"transformer.layers.{i}"
        hd, qn, kn = self.head_size, self.q_per_rank, self.kv_per_rank
        scale = 1.0 / math.sqrt(hd)

        # attention, each tp rank over its own heads
        attn_out = []
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, f"{L}.input_layernorm.weight"))
            name = f"{L}.attention.qkv"
            qkv = linear(x, self._mod(p, t, name), self.qcfg, name)
            if qkv.shape[-1] != (qn + 2 * kn) * hd:
                raise UserError(f"rank{p * self.tp + t}: {name} gives {qkv.shape[-1]} outputs, expected "
                                f"({qn} q + 2 x {kn} kv heads) x head_size {hd} = {(qn + 2 * kn) * hd}")
            b, s, _ = qkv.shape
            q, k, v = qkv.split([qn * hd, kn * hd, kn * hd], dim=-1)
            q = q.view(b, s, qn, hd).transpose(1, 2)
            k = k.view(b, s, kn, hd).transpose(1, 2)
            v = v.view(b, s, kn, hd).transpose(1, 2)
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
            k, v = KV_CACHE_KERNELS[self.qcfg.kv_cache_quant_algo](
                k, v, self.ranks[p][t].get(f"{L}.attention", {}), self.qcfg)
            if kn != qn:
                k = k.repeat_interleave(qn // kn, dim=1)
                v = v.repeat_interleave(qn // kn, dim=1)
            scores = (q @ k.transpose(-1, -2)).float() * scale
            mask = torch.ones(s, s, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            ctx = (probs @ v).transpose(1, 2).reshape(b, s, qn * hd)
            attn_out.append(ctx)
        dense = self._row_parallel(p, f"{L}.attention.dense", attn_out)
        hs = [hs[t] + dense[t] for t in range(self.tp)]

        if self.moe:
            return self._moe_mlp(p, L, hs)
        # MLP: proj(silu(fc(x)) * gate(x)); fc = HF gate_proj, gate = HF up_proj
        mids = []
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, f"{L}.post_layernorm.weight"))
            fc = linear(x, self._mod(p, t, f"{L}.mlp.fc"), self.qcfg, f"{L}.mlp.fc")
            gate = linear(x, self._mod(p, t, f"{L}.mlp.gate"), self.qcfg, f"{L}.mlp.gate")
            mids.append(F.silu(fc) * gate)
        proj = self._row_parallel(p, f"{L}.mlp.proj", mids)
        return [hs[t] + proj[t] for t in range(self.tp)]

    def _moe_mlp(self, p: int, L: str, hs: list[Tensor]) -> list[Tensor]:
        """Mixture of experts (verify/reference_moe.py): every rank's partial, all-reduced."""
        total = None
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, f"{L}.post_layernorm.weight"))
            mods = {m: self._mod(p, t, f"{L}.mlp.{m}") for m in ("router", "fc", "proj")}
            y = moe_partial(x, mods, self.moe, t, linear, self.qcfg, f"{L}.mlp")
            total = y if total is None else total + y            # all-reduce
        return [hs[t] + total for t in range(self.tp)]

    def _logits(self, hs: list[Tensor]) -> Tensor:
        p = self.pp - 1
        parts = []
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, "transformer.ln_f.weight"))
            head = self.ranks[p][t].get("lm_head")
            if head is None or "weight" not in head:
                head = self._shared_head(t)
            parts.append(linear(x, head, self.qcfg, "lm_head"))
        logits = torch.cat(parts, dim=-1)                             # all-gather
        if logits.shape[-1] < self.vocab_size:
            raise UserError(f"lm_head gives {logits.shape[-1]} logits < vocab_size {self.vocab_size}")
        return logits[..., : self.vocab_size]

    def _shared_head(self, t: int) -> dict[str, Tensor]:
        """lm_head absent: TensorRT-LLM's share_embedding_table reuses the vocab embedding."""
        c = self.config
        if not (c.get("share_embedding_table") or c.get("tie_word_embeddings")):
            raise UserError(f"rank{(self.pp - 1) * self.tp + t}.safetensors: tensor lm_head.weight is missing")
        w = self._w(0, t, "transformer.vocab_embedding.weight")
        if not self.use_parallel_embedding or self.tp == 1:
            rows = -(-w.shape[0] // self.tp)
            w = F.pad(w, (0, 0, 0, rows * self.tp - w.shape[0]))[t * rows:(t + 1) * rows]
        elif self.embedding_sharding_dim != 0:
            raise UserError("share_embedding_table needs the embedding sharded on dim 0")
        return {"weight": w}


# --------------------------------------------------------------------------------------------
# Comparison with Hugging Face
# --------------------------------------------------------------------------------------------

# Pass thresholds on rel = ||ref - hf|| / ||hf|| over all logits, by the checkpoint's dtype.
# fp32: both sides compute the same float32 arithmetic in a different order; observed ~1e-7,
#   1e-5 leaves headroom for longer sums (real models) while any wrong tensor gives rel >= 1e-2.
# fp16 / bf16: the checkpoint's weights are the HF fp32 weights rounded once to the storage dtype,
#   a relative perturbation of at most the unit roundoff u (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3),
#   uniformly distributed per element. The reference computes in fp32, so the only error is those
#   rounded weights propagated to the logits, which, for a few dozen independent rounded matrices
#   in a stable network, stays within a small multiple of u. We allow 16u (fp16 7.8e-3, bf16 6.3e-2):
#   tiny random models exported by modelopt measure 1.3-2u; a layout error (swapped fc/gate, two q
#   heads swapped, a tp rank's replicated norm off) gives rel 6e-2..4e-1, far above it.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
REL_TOLERANCE = {"float32": 1e-5, "float16": 16 * 2.0 ** -11, "bfloat16": 16 * 2.0 ** -8}
# Argmax may legitimately flip where two logits nearly tie, more often the coarser the rounding, so a
# fraction of positions is allowed to disagree (fp32: only an exact numerical tie would).
MIN_ARGMAX_AGREEMENT = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.8}


# Quantized checkpoints compared with the FLOAT Hugging Face model: the difference is the format's
# quantization error, which depends on the model (outliers, depth), so these thresholds are sanity
# bounds that catch layout/scale errors (a wrong or misplaced tensor gives rel err ~0.6..1+ and argmax
# agreement near chance), not quality targets: quality is measured by perplexity (BENCHMARKS.md
# "Quality", ``python -m verify.reference --eval-ppl``). Measured rel err vs the float model on tiny
# random models (the hardest case: no structure, 2 layers of random weights; calibration 4 x 64):
#   W8A8_SQ_PER_CHANNEL 0.19   FP8 0.11   W4A16_AWQ (group 128) 0.36   KV INT8 1.4e-2   KV FP8 4e-2
#   W8A16 1.8e-2; W4A16 (per channel) 0.32 with 47 % argmax agreement (tiny, hidden 128)
# A format's bound is (max rel err, min argmax agreement); with a KV format too, the rel errors add
# and the lower agreement applies.
QUANT_TOLERANCE = {
    "W8A16": (0.05, 0.85),
    "W4A16": (0.5, 0.3),
    "W8A8_SQ_PER_CHANNEL": (0.4, 0.5),
    "FP8": (0.3, 0.6),
    "W4A16_AWQ": (0.6, 0.3),
}
KV_TOLERANCE = {"INT8": (0.05, 0.85), "FP8": (0.1, 0.8)}


def tolerance_for(config: dict) -> tuple[float, float]:
    """(max relative error, min argmax agreement) vs the float HF model for a checkpoint's config."""
    dtype = str(config.get("dtype", "float32"))
    if dtype not in REL_TOLERANCE:
        raise UserError(f"checkpoint dtype {dtype!r} has no tolerance (known: {', '.join(REL_TOLERANCE)})")
    rel, agree = REL_TOLERANCE[dtype], MIN_ARGMAX_AGREEMENT[dtype]
    q = config.get("quantization") or {}
    for table, key in ((QUANT_TOLERANCE, q.get("quant_algo")), (KV_TOLERANCE, q.get("kv_cache_quant_algo"))):
        if key is not None:
            if key not in table:
                raise UserError(f"{key} has no verify tolerance (known: {', '.join(table)})")
            rel, agree = rel + table[key][0], min(agree, table[key][1])
    return rel, agree


def _default_ids(vocab: int, batch=2, seq=32, seed=0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _load_hf(hf_model_or_dir):
    if not isinstance(hf_model_or_dir, (str, Path)):
        return hf_model_or_dir
    d = Path(hf_model_or_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"Hugging Face directory {d} has no config.json")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the Hugging Face model from {d}: {' '.join(str(e).split())[:300]}") from None


def compare_with_hf(ckpt_dir, hf_model_or_dir, input_ids=None, text=None, tokenizer=None,
                    reference: ReferenceModel | None = None, random_shape=(2, 32)) -> dict:
    """Run the checkpoint and the HF model on the same ids; return error statistics over the logits.

    ``hf_model_or_dir``: a loaded HF causal LM (used as given) or a directory (loaded in float32).
    Inputs: ``input_ids`` [batch, seq], or ``text`` (tokenized with ``tokenizer``, or the tokenizer in
    the HF directory), or else fixed pseudo-random ids of ``random_shape`` (batch, seq; seed 0).
    ``reference``: an already built ReferenceModel of ``ckpt_dir`` (saves reading it again).
    """
    ref = reference or ReferenceModel(ckpt_dir)
    hf = _load_hf(hf_model_or_dir)
    hf_vocab = getattr(hf.config, "vocab_size", None)
    vocab = ref.vocab_size
    if hf_vocab is not None and int(hf_vocab) != ref.vocab_size:
        # modelopt's AWQ export pads the vocabulary to a multiple of 64 and writes the padded size:
        # compare the real tokens' logits (the padded rows are zero).
        if not (ref.qcfg.quant_algo == "W4A16_AWQ" and int(hf_vocab) < ref.vocab_size <= int(hf_vocab) + 63):
            raise UserError(f"vocab_size differs: checkpoint {ref.vocab_size}, Hugging Face model {hf_vocab}")
        vocab = int(hf_vocab)
    if input_ids is None and text is not None:
        if tokenizer is None:
            if not isinstance(hf_model_or_dir, (str, Path)):
                raise UserError("text given without a tokenizer (pass tokenizer= or a Hugging Face directory)")
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(hf_model_or_dir)
            except (OSError, ValueError) as e:
                raise UserError(f"no usable tokenizer in {hf_model_or_dir}: {' '.join(str(e).split())[:200]}") from None
        input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if input_ids.numel() == 0:
            raise UserError("the text tokenizes to no tokens")
    if input_ids is None:
        input_ids = _default_ids(vocab, *random_shape)
    input_ids = torch.as_tensor(input_ids).long()
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)

    got = ref.forward(input_ids)[..., :vocab]
    with torch.no_grad():
        want = hf(input_ids=input_ids).logits.float()
    want = want[..., :vocab]
    diff = got.double() - want.double()
    rel = float(diff.norm() / want.double().norm().clamp_min(1e-30))
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return {
        "max_abs_err": float(diff.abs().max()),
        "rel_err": rel,
        "argmax_agreement": agree,
        "tokens": int(input_ids.numel()),
        "shape": list(got.shape),
        "dtype": str(ref.config.get("dtype", "float32")),
        "quant": "+".join(f"{k} {v}" for k, v in (("", ref.qcfg.quant_algo), ("kv", ref.qcfg.kv_cache_quant_algo))
                          if v).strip() or None,
        "tp": ref.tp,
        "pp": ref.pp,
    }


def verify(ckpt_dir, hf_dir, input_ids=None, text=None, tokenizer=None,
           random_shape=(2, 32)) -> tuple[dict, bool]:
    """``compare_with_hf`` plus a verdict from the checkpoint dtype's tolerance (see REL_TOLERANCE).

    Returns (report, passed); the report also holds the tolerances and ``passed``.
    """
    ref = ReferenceModel(ckpt_dir)
    report = compare_with_hf(ckpt_dir, hf_dir, input_ids=input_ids, text=text, tokenizer=tokenizer,
                             reference=ref, random_shape=random_shape)
    rel_tol, min_agree = tolerance_for(ref.config)
    ok = (math.isfinite(report["rel_err"]) and report["rel_err"] < rel_tol
          and report["argmax_agreement"] >= min_agree)
    report.update(rel_tolerance=rel_tol, min_argmax_agreement=min_agree, passed=ok)
    return report, ok


def summary_line(report: dict, ckpt_dir) -> str:
    quant = f" ({report['quant']} vs the float model)" if report.get("quant") else ""
    return (f"{'PASS' if report['passed'] else 'MISMATCH'} {ckpt_dir}: dtype {report['dtype']}{quant} "
            f"tp {report['tp']} pp {report['pp']}, {report['tokens']} tokens: "
            f"rel err {report['rel_err']:.3e} (tolerance {report['rel_tolerance']:.1e}), "
            f"max abs err {report['max_abs_err']:.3e}, "
            f"argmax agreement {100 * report['argmax_agreement']:.1f}% (min {100 * report['min_argmax_agreement']:.0f}%)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m verify.reference",
        description="Run a TensorRT-LLM checkpoint on CPU with TensorRT-LLM's semantics and compare its "
                    "logits with the Hugging Face model. Exit 0: match, 1: mismatch, 2: bad input.")
    ap.add_argument("ckpt_dir", help="TensorRT-LLM checkpoint directory (config.json + rank*.safetensors)")
    ap.add_argument("--hf", required=True, metavar="HF_DIR", help="the Hugging Face model directory it came from")
    ap.add_argument("--text", help="text to run (tokenized with HF_DIR's tokenizer); default: random ids")
    ap.add_argument("--seq-len", type=int, default=32, help="length of the random ids (default 32)")
    ap.add_argument("--batch", type=int, default=2, help="batch of the random ids (default 2)")
    ap.add_argument("--eval-ppl", metavar="FILE", help="also print the perplexity of the checkpoint and of "
                    "the HF model on this text file (HF_DIR's tokenizer)")
    ap.add_argument("--ppl-seq-len", type=int, default=256, help="perplexity window length (default 256)")
    ap.add_argument("--ppl-max-tokens", type=int, default=4096, help="tokens of FILE used (default 4096)")
    args = ap.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the output to the one summary line
    except ImportError:
        pass
    try:
        if args.seq_len < 1 or args.batch < 1:
            raise UserError("--seq-len and --batch must be >= 1")
        ppl_text = None
        if args.eval_ppl is not None:
            from .perplexity import read_text_file

            ppl_text = read_text_file(args.eval_ppl)
        report, ok = verify(args.ckpt_dir, args.hf, text=args.text, random_shape=(args.batch, args.seq_len))
        print(summary_line(report, args.ckpt_dir))
        if ppl_text is not None:
            from .perplexity import checkpoint_ppl, hf_ppl, ppl_line

            kw = dict(seq_len=args.ppl_seq_len, max_tokens=args.ppl_max_tokens)
            print(ppl_line("checkpoint", checkpoint_ppl(args.ckpt_dir, ppl_text, hf_dir=args.hf, **kw)))
            print(ppl_line("Hugging Face model", hf_ppl(args.hf, ppl_text, **kw)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0 if ok else 1


if __name__ == "__main__":
    # Run the imported module's main: the quantized kernels register into ``verify.reference``'s
    # tables, not into this ``__main__`` copy's.
    from verify.reference import main as _main

    sys.exit(_main())
