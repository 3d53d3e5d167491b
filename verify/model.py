"""The transformer math of the CPU reference reader: a TensorRT-LLM checkpoint run rank by rank with
TensorRT-LLM's semantics (see verify/reference.py for how the ranks combine), one decoder layer at
a time.

Model: Llama-family decoder (Llama, Mistral, Qwen2, Qwen3; mixtures of experts in verify/reference_moe.py; Gemma 2 / 3's
differences in verify/decoder.py; MLA in verify/mla.py): RMSNorm, GPT-NeoX rotary (verify/rotary.py) with optional ``rotary_scaling`` (``llama3`` and ``linear``, computed as transformers does), a family's
per-head q/k norms where its spec has them (``Family.qk_norms``: RMSNorm of each q and k head after
the qkv projection, before RoPE, eps ``model.spec.QK_NORM_EPS`` as TensorRT-LLM's attention
builds them), causal grouped-query attention, SiLU-gated MLP ``proj(silu(fc(x)) * gate(x))``. Note the names: ``mlp.fc`` is HF
``gate_proj`` (the SiLU branch) and ``mlp.gate`` is HF ``up_proj``.

:meth:`ReferenceModel.forward_windows` runs many batches layer by layer; with ``lazy=True`` only the
layer being run is in memory (read from every rank's safetensors, every batch run through it, then
freed), so the reader's peak is one layer plus the batches' activations, whatever the depth.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from common.heap import release_memory
from common.errors import UserError
from model.families import ARCHITECTURES, FAMILIES
from model.spec import QK_NORM_EPS

from .checkpoint import LAYER_RE, mapping, open_checkpoint, pp_layers
from .decoder import Semantics, attend, lm_softcap, rms_norm
from .kernels import KV_CACHE_KERNELS, LINEAR_INPUT_SCALES, LINEAR_KERNELS, QuantSpec, linear, names_of
from .mla import MlaSpec, mla_layer
from .reference_moe import MoeSpec, moe_partial
from .rotary import LongRope, apply_rotary, rotary_inv_freq  # noqa: F401 (re-exported)

Tensor = torch.Tensor

#: rows of an unquantized lm_head multiplied at a time: its float32 copy never exists whole (the
#: logits equal the whole product's bit for bit: each logit is the same dot product)
HEAD_CHUNK = 8192


class ReferenceModel:
    """A TensorRT-LLM checkpoint run on CPU rank by rank; ``forward(ids) -> float32 logits``.

    ``lazy``: keep the tensors in the rank files and read each decoder layer when it runs (peak
    memory one layer; see :meth:`forward_windows`); else every rank is read into memory once."""

    def __init__(self, ckpt_dir, compute_dtype: torch.dtype | None = None, *, lazy: bool = False):
        self.ckpt_dir = Path(ckpt_dir)
        self.config, ranks = open_checkpoint(ckpt_dir, lazy)
        self.lazy = lazy
        self.compute_dtype = compute_dtype or torch.float32
        where = self.ckpt_dir / "config.json"
        self.tp, self.pp = mapping(self.config, where)
        self.qcfg = QuantSpec.from_config(self.config)
        self._read_shape(self.config, where)
        self._check_kernels()
        # ranks[pp][tp]: that rank's tensors by module (verify/checkpoint.py RankTensors)
        self.ranks = [[ranks[p * self.tp + t] for t in range(self.tp)] for p in range(self.pp)]
        self._check_stage_layers(self.config, where)

    def _read_shape(self, c: dict, where) -> None:
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
        if pe not in ("rope_gpt_neox", "long_rope"):
            raise UserError(f"{where}: position_embedding_type {pe!r} is not supported "
                            "(rope_gpt_neox, long_rope)")
        self.moe = MoeSpec.from_config(c, self.tp, where)  # None: dense MLP
        self.sem = Semantics.from_config(c, where, bool(self.moe))  # verify/decoder.py
        if c.get("residual_mlp"):
            raise UserError(f"{where}: residual_mlp is not supported by the reference reader")
        self._split_heads(where)
        self._read_qk_norms(arch, where)
        # Rotary tables' frequencies, fp32 as in transformers.
        self.rot_dim = int(self.head_size * float(c.get("rotary_pct", 1.0)))
        if c.get("rotary_dim"):
            self.rot_dim = int(c["rotary_dim"])
        base = float(c.get("rotary_base", 10000.0))
        self.mla = MlaSpec.from_config(c, where)  # DeepSeek-V2 (verify/mla.py): its own yarn
        self.inv_freq = None if self.mla else rotary_inv_freq(self.rot_dim, base,
                                                              c.get("rotary_scaling"))
        self.longrope = LongRope(c, self.rot_dim, base, where) if pe == "long_rope" else None
        self.local_inv_freq = (rotary_inv_freq(self.rot_dim, self.sem.local_base, None)
                               if self.sem.local_base is not None else self.inv_freq)
        self.use_parallel_embedding = bool(c.get("use_parallel_embedding", False))
        self.embedding_sharding_dim = int(c.get("embedding_sharding_dim", 0))

    def _split_heads(self, where) -> None:
        if self.heads % self.tp:
            raise UserError(f"{where}: num_attention_heads {self.heads} is not divisible by tp_size {self.tp}")
        if self.kv_heads % self.tp and self.tp % self.kv_heads:
            raise UserError(f"{where}: num_key_value_heads {self.kv_heads} and tp_size {self.tp}: "
                            "neither divides the other")
        self.q_per_rank = self.heads // self.tp
        self.kv_per_rank = max(1, self.kv_heads // self.tp)
        if self.q_per_rank % self.kv_per_rank:
            raise UserError(f"{where}: {self.q_per_rank} q heads per rank do not group over {self.kv_per_rank} kv heads")

    def _read_qk_norms(self, arch: str, where) -> None:
        """The TensorRT-LLM modules of the per-head q and k norms of the checkpoint's family (by its
        ``architecture``; none for a family without them or an architecture not known here)."""
        family = FAMILIES.get(ARCHITECTURES.get(arch, ""))
        self.qk_norms = tuple(family.qk_norm_names().values()) if family else ()
        if self.qk_norms and self.q_per_rank == self.kv_per_rank > 1:
            raise UserError(f"{where}: {self.q_per_rank} attention and KV heads per rank with q/k "
                            f"norms: TensorRT-LLM 1.2 reads that qkv interleaved per head, which "
                            f"this reader does not model")

    def _check_kernels(self) -> None:
        """Quantization: fail now, before any compute, for a format that has no kernel."""
        q = self.qcfg  # the kernel tables are keyed by the format (verify/kernels.py)
        if _unregistered(LINEAR_KERNELS, q.quant_algo):
            raise UserError(f"quant_algo {self.qcfg.quant_algo} is not supported by the reference reader yet "
                            f"(supported: {names_of(LINEAR_KERNELS)})")
        if _unregistered(KV_CACHE_KERNELS, q.kv_cache_quant_algo):
            raise UserError(f"kv_cache_quant_algo {self.qcfg.kv_cache_quant_algo} is not supported by the "
                            f"reference reader yet (supported: {names_of(KV_CACHE_KERNELS)})")

    def _check_stage_layers(self, c: dict, where) -> None:
        partition = (c.get("mapping") or {}).get("pp_partition")
        if partition and (len(partition) != self.pp or sum(partition) != self.num_layers):
            raise UserError(f"{where}: mapping.pp_partition {partition} does not split {self.num_layers} layers "
                            f"over pp_size {self.pp}")
        self.stage_layers = [pp_layers(self.num_layers, self.pp, p, partition) for p in range(self.pp)]
        for p in range(self.pp):
            for t in range(self.tp):
                r = p * self.tp + t
                have = sorted({int(m.group(1)) for n in self.ranks[p][t].names if (m := LAYER_RE.match(n))})
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

    def _lin(self, p: int, t: int, name: str) -> dict[str, Tensor]:
        """A linear's tensors on one rank, plus its ``input_scale`` (see LINEAR_INPUT_SCALES)."""
        params = self._mod(p, t, name)
        layer, _, short = name.partition(".")[2].partition(".")[2].partition(".")
        src = LINEAR_INPUT_SCALES.get(short)
        if src is None:
            return params
        mod, _, key = f"transformer.layers.{layer}.{src}".rpartition(".")
        scale = self.ranks[p][t].get(mod, {}).get(key)
        return params if scale is None else {**params, "input_scale": scale}

    def _norm(self, x: Tensor, w: Tensor, eps: float | None = None) -> Tensor:
        return rms_norm(x, w, self.eps if eps is None else eps, self.sem.norm_fp32)

    # ---- forward -----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits float32 [batch, seq, vocab_size] for ``input_ids`` [batch, seq] (positions 0..seq-1)."""
        return next(self.forward_windows([input_ids]))

    __call__ = forward

    @torch.no_grad()
    def forward_windows(self, batches: Iterable[Tensor]) -> Iterator[Tensor]:
        """For each batch of ``batches``, what ``forward(batch)`` gives, computed one decoder layer at
        a time: every batch's hidden states go through layer i (of every rank; on a lazy reader read
        for it and freed after it) before layer i + 1. The logits come one batch at a time."""
        ids = [self._check_ids(b) for b in batches]
        rotary = [self._rotary(b.shape[1]) for b in ids]
        with self._holding(0, ["transformer.vocab_embedding"]):
            hs = [self._embed(b) for b in ids]     # per batch, one hidden state per tp rank
        for p in range(self.pp):
            for i in range(len(self.stage_layers[p])):
                with self._holding(p, layer=i):
                    hs = [self._layer(p, i, h, rot) for h, rot in zip(hs, rotary)]
            # send/recv: tp rank t of stage p -> tp rank t of stage p+1 (the lists carry over as they are)
        head = ["transformer.ln_f", "lm_head"]
        with self._holding(self.pp - 1, head), self._holding(0, [] if self._has_head() else
                                                             ["transformer.vocab_embedding"]):
            for k in range(len(hs)):
                h, hs[k] = hs[k], None
                yield self._logits(h).float()

    def _check_ids(self, input_ids) -> Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise UserError(f"input_ids must be an integer tensor [batch, seq], got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise UserError(f"input_ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids

    def _rotary(self, seq: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((cos, sin) of the global base, (cos, sin) of the sliding layers' base)."""
        if self.mla is not None:
            return self.mla.rotary(seq, self.compute_dtype)
        pos = torch.arange(seq, dtype=torch.float32)
        out = []
        inv, scale = self.longrope.for_length(seq) if self.longrope else (self.inv_freq, 1.0)
        for inv_freq in (inv, self.local_inv_freq):
            emb = torch.cat([pos[:, None] * inv_freq[None, :]] * 2, dim=-1)
            out.append(((emb.cos() * scale).to(self.compute_dtype),
                        (emb.sin() * scale).to(self.compute_dtype)))
        return tuple(out)

    @contextmanager
    def _holding(self, p: int, prefixes: list[str] = (), layer: int | None = None):
        """Stage ``p``'s modules (or its decoder ``layer``) resident on every tp rank meanwhile."""
        for rank in self.ranks[p]:
            rank.hold(rank.layer_modules(layer) if layer is not None else prefixes)
        try:
            yield
        finally:
            for rank in self.ranks[p]:
                rank.release()
            if self.lazy:
                release_memory()

    def _has_head(self) -> bool:
        return all(r.has("lm_head") for r in self.ranks[self.pp - 1])

    def _embed(self, ids: Tensor) -> list[Tensor]:
        hs = self._lookup(ids)
        if self.sem.embed_scale is None:
            return hs
        scale = torch.tensor(self.sem.embed_scale, dtype=self.compute_dtype)  # in the model dtype
        return [h * scale for h in hs]

    def _lookup(self, ids: Tensor) -> list[Tensor]:
        dt = self.compute_dtype
        tabs = [self._w(0, t, "transformer.vocab_embedding.weight") for t in range(self.tp)]
        if not self.use_parallel_embedding or self.tp == 1:
            return [F.embedding(ids, w).to(dt) for w in tabs]
        if self.embedding_sharding_dim == 0:
            rows = tabs[0].shape[0]
            if rows * self.tp < self.vocab_size:
                raise UserError(f"vocab_embedding holds {rows} rows per rank x tp {self.tp} < vocab_size {self.vocab_size}")
            total = None
            for t, w in enumerate(tabs):
                local = ids - t * rows
                hit = (local >= 0) & (local < w.shape[0])
                part = F.embedding(local.clamp(0, w.shape[0] - 1), w).to(dt) * hit.unsqueeze(-1).to(dt)
                total = part if total is None else total + part      # all-reduce
            return [total] * self.tp
        if self.embedding_sharding_dim == 1:
            full = torch.cat([F.embedding(ids, w).to(dt) for w in tabs], dim=-1)  # all-gather
            return [full] * self.tp
        raise UserError(f"embedding_sharding_dim {self.embedding_sharding_dim} is not 0 or 1")

    def _row_parallel(self, p: int, name: str, xs: list[Tensor]) -> list[Tensor]:
        """Sum of every rank's partial product, then each rank adds its own copy of the bias."""
        total = None
        for t in range(self.tp):
            y = linear(xs[t], self._lin(p, t, name), self.qcfg, name, add_bias=False)
            total = y if total is None else total + y            # all-reduce
        outs = []
        for t in range(self.tp):
            b = self._mod(p, t, name).get("bias")
            outs.append(total if b is None else total + b.to(total.dtype))
        return outs

    def _layer(self, p: int, i: int, hs: list[Tensor], rot) -> list[Tensor]:
        if self.mla is not None:
            return mla_layer(self, p, i, hs, rot)
        L = f"transformer.layers.{i}"
        inter = self.sem.inter_layernorms  # Gemma 2/3: the sublayers' outputs are normalised too
        dense = self._row_parallel(p, f"{L}.attention.dense", self._attention(p, i, hs, rot))
        if inter:
            dense = [self._norm(dense[t], self._w(p, t, f"{L}.post_layernorm.weight"))
                     for t in range(self.tp)]
        hs = [hs[t] + dense[t] for t in range(self.tp)]

        if self.moe:
            return self._moe_mlp(p, L, hs)
        # MLP: proj(act(fc(x)) * gate(x)); fc = HF gate_proj, gate = HF up_proj
        mids = []
        norm = "pre_feedforward_layernorm" if inter else "post_layernorm"
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, f"{L}.{norm}.weight"))
            fc = linear(x, self._lin(p, t, f"{L}.mlp.fc"), self.qcfg, f"{L}.mlp.fc")
            if self.sem.fused_fc:  # MLP "swiglu": fc = [up; gate] per rank, silu(gate) * up
                gate, fc = fc.chunk(2, dim=-1)
            else:
                gate = linear(x, self._lin(p, t, f"{L}.mlp.gate"), self.qcfg, f"{L}.mlp.gate")
            mids.append(self.sem.act(fc) * gate)
        proj = self._row_parallel(p, f"{L}.mlp.proj", mids)
        if inter:
            proj = [self._norm(proj[t], self._w(p, t, f"{L}.post_feedforward_layernorm.weight"))
                    for t in range(self.tp)]
        return [hs[t] + proj[t] for t in range(self.tp)]

    def _attention(self, p: int, i: int, hs: list[Tensor], rot) -> list[Tensor]:
        """Each tp rank's attention context [b, s, its heads x head_size] (before attention.dense)."""
        L = f"transformer.layers.{i}"
        hd, qn, kn = self.head_size, self.q_per_rank, self.kv_per_rank
        layer = self.stage_layers[p][i]  # the global index decides the window and rotary base
        cos, sin = rot[1] if self.sem.is_local(layer) else rot[0]
        attn_out = []
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, f"{L}.input_layernorm.weight"))
            name = f"{L}.attention.qkv"
            qkv = linear(x, self._lin(p, t, name), self.qcfg, name)
            if qkv.shape[-1] != (qn + 2 * kn) * hd:
                raise UserError(f"rank{p * self.tp + t}: {name} gives {qkv.shape[-1]} outputs, expected "
                                f"({qn} q + 2 x {kn} kv heads) x head_size {hd} = {(qn + 2 * kn) * hd}")
            b, s, _ = qkv.shape
            q, k, v = qkv.split([qn * hd, kn * hd, kn * hd], dim=-1)
            q = q.view(b, s, qn, hd).transpose(1, 2)
            k = k.view(b, s, kn, hd).transpose(1, 2)
            v = v.view(b, s, kn, hd).transpose(1, 2)
            if self.qk_norms:  # per head, before RoPE (TensorRT-LLM's qk_layernorm)
                qw, kw = (self._w(p, t, f"{L}.{m}.weight") for m in self.qk_norms)
                q, k = self._norm(q, qw, QK_NORM_EPS), self._norm(k, kw, QK_NORM_EPS)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k, v = KV_CACHE_KERNELS[self.qcfg.kv_cache_quant_algo](
                k, v, self.ranks[p][t].get(f"{L}.attention", {}), self.qcfg)
            if kn != qn:
                k = k.repeat_interleave(qn // kn, dim=1)
                v = v.repeat_interleave(qn // kn, dim=1)
            ctx = attend(q, k, v, self.sem, layer).transpose(1, 2).reshape(b, s, qn * hd)
            attn_out.append(ctx)
        return attn_out

    def _moe_mlp(self, p: int, L: str, hs: list[Tensor]) -> list[Tensor]:
        """Mixture of experts (verify/reference_moe.py): every rank's partial, all-reduced."""
        total = None
        for t in range(self.tp):
            x = self._norm(hs[t], self._w(p, t, f"{L}.post_layernorm.weight"))
            shared = ("shared_expert.fc", "shared_expert.proj", "shared_expert_gate")
            mods = {m: self._mod(p, t, f"{L}.mlp.{m}")
                    for m in ("router", "fc", "proj") + (shared if self.moe.shared_expert else ())}
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
            parts.append(self._head(x, head))
        logits = torch.cat(parts, dim=-1)                             # all-gather
        if logits.shape[-1] < self.vocab_size:
            raise UserError(f"lm_head gives {logits.shape[-1]} logits < vocab_size {self.vocab_size}")
        return lm_softcap(logits[..., : self.vocab_size], self.sem)

    def _head(self, x: Tensor, head: dict[str, Tensor]) -> Tensor:
        """lm_head on one rank; unquantized, HEAD_CHUNK rows at a time (same logits, less memory)."""
        w = head.get("weight")
        if self.qcfg.algo_for("lm_head") is not None or set(head) != {"weight"} or w.shape[0] <= HEAD_CHUNK:
            return linear(x, head, self.qcfg, "lm_head")
        return torch.cat([linear(x, {"weight": w[a:a + HEAD_CHUNK]}, self.qcfg, "lm_head")
                          for a in range(0, w.shape[0], HEAD_CHUNK)], dim=-1)

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


def _unregistered(table: dict, key) -> bool:  # no kernel for ``key`` in a format-keyed table
    return key not in table
