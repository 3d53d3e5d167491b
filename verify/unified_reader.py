"""Loader of modelopt "unified" HF checkpoints for the CPU reference reader (verify/reference.py).

``load_unified(dir) -> (config, [rank0 tensors])`` maps a unified checkpoint (what
quantize/unified/ and modelopt's ``export_hf_checkpoint`` write) into the TensorRT-LLM tp-1
checkpoint form the reader already runs, so the same kernels (kernels.py / reference_quant.py)
serve both targets: one set of kernels, two loaders. The mapping itself (``UnifiedMap``: config,
global tensors, one decoder layer) is shared with the layer-by-layer reader (verify/unified_lazy.py).

Names (``NAMES``): ``model.embed_tokens`` -> ``transformer.vocab_embedding``, q/k/v ->
``attention.qkv`` (concatenated along the output dim), ``o_proj`` -> ``attention.dense``,
``gate_proj`` -> ``mlp.fc`` (the SiLU branch), ``up_proj`` -> ``mlp.gate``, ``down_proj`` ->
``mlp.proj``, norms -> ``input_layernorm`` / ``post_layernorm`` / ``ln_f``, and a family's
per-head q/k norms (``q_norm`` -> ``attention.q_layernorm``, model.spec ``qk_norms``); suffixes
(``SUFFIXES``): ``weight_scale`` -> ``weights_scaling_factor``, ``input_scale`` ->
``activation_scaling_factor`` [1], ``pre_quant_scale`` -> ``prequant_scaling_factor``.

How TensorRT-LLM's PyTorch backend loads the fused layers (``tensorrt_llm/_torch/modules/linear.py``),
reproduced here where the formats need it:

* FP8 (``FP8QDQLinearMethod.rescale_fused_weights``): q/k/v (and gate/up) get the max of their
  input scales and of their weight scales; each shard is re-quantized: fp8 -> model dtype,
  ``* own scale / max scale`` -> fp8. Our mlp.fc / mlp.gate take the same fused scales and weights.
* W8A8_SQ_PER_CHANNEL: q/k/v share pre_quant_scale and input_scale (modelopt fused them before
  export, checked here); per-channel weight scales are concatenated.
* W4A16_AWQ: packed int4 [out/2, in] concatenated along out (even row counts keep the nibble pairs);
  the q/k/v and gate/up pre_quant_scale was folded into the norms by the export, so those linears get
  a pre_quant_scale of ones.
* NVFP4: packed E2M1 [out, in/2] and E4M3 block scales [out, in/16] concatenated along out;
  q/k/v (and gate/up) share ``weight_scale_2`` and ``input_scale`` (modelopt fused them), checked
  here; the NVFP4 kernel (verify/reference_nvfp4.py) runs them.
* W4A8_AWQ: as W4A16_AWQ, with ``weight_scale_2`` -> ``weights_scaling_factor_2`` and
  ``input_scale`` [1], shared by the fused linears (modelopt's fusion unified them).
* FP8 KV cache: ``kv_cache_scaling_factor`` = max(k_scale, v_scale) (the single scale of the
  TRT-LLM checkpoint form, as modelopt's TRT-LLM export computes it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from common.errors import UserError
from model.families import ARCHITECTURES, FAMILIES
from model.spec import DIMS, HF_LAYER, TRT_LAYER
from quantize.recipes import find_recipe

Tensor = torch.Tensor

SUFFIXES = {"weight": "weight", "bias": "bias", "weight_scale": "weights_scaling_factor",
            "input_scale": "activation_scaling_factor", "pre_quant_scale": "prequant_scaling_factor",
            "weight_scale_2": "weights_scaling_factor_2"}
#: per-tensor scales of a linear, [] in the unified checkpoint, [1] in the TRT-LLM form
SCALARS = ("input_scale", "weight_scale_2")
#: the Llama-family layout (model.families) the unified checkpoints of this project use
LAYOUT = FAMILIES["llama"]
QKV = LAYOUT.linear("attention.qkv")


def names_of(family) -> dict[str, str]:
    """unified module (after model.layers.i.) -> TRT-LLM module of ``family``'s single-source
    linears and its norms (q/k norms included); q/k/v are fused separately."""
    return {**{lin.hf[0]: lin.name for lin in family.dense_linears() if len(lin.hf) == 1},
            **family.norm_names(), **family.qk_norm_names()}


NAMES = names_of(LAYOUT)
GLOBAL_NAMES = LAYOUT.global_names()


def _module(name: str, prefix: str) -> str:
    return name[len(prefix):].removesuffix(".weight")
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.([a-z_]+(?:_\d+)?)$")


def is_unified_checkpoint(d) -> bool:
    """True for a HF-style directory (config.json with ``architectures``, no TRT-LLM ``mapping``)."""
    p = Path(d) / "config.json"
    try:
        c = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(c, dict) and "architectures" in c and "mapping" not in c


def _trtllm_quantization(d: Path) -> dict:
    p = d / "hf_quant_config.json"
    if not p.is_file():
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    try:
        q = json.loads(p.read_text(encoding="utf-8"))["quantization"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p} is not a modelopt hf_quant_config.json ({e})") from None
    out = {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo")}
    for k in ("group_size", "has_zero_point", "pre_quant_scale"):
        if k in q:
            out[k] = q[k]
    if _unified(out).weight is not None:
        out["exclude_modules"] = ["lm_head"]  # the only linear modelopt leaves unquantized here
    return out


def _unified(quant: dict):
    """The recipe's UnifiedFormat of a checkpoint's quantization (UserError: none)."""
    recipe = find_recipe(quant["quant_algo"])
    fmt = recipe.unified if recipe is not None else None
    if fmt is None:
        raise UserError(f"unified checkpoint with unsupported quant_algo {quant['quant_algo']!r}")
    return fmt


def _fp8_fuse(parts: list[dict], dtype: torch.dtype) -> dict:
    """TensorRT-LLM PyTorch backend's FP8 fused-shard loading: max scales, re-quantized shards."""
    wmax = torch.stack([p["weight_scale"].float().reshape(()) for p in parts]).max()
    out = {"weights_scaling_factor": wmax.reshape(1),
           "weight": [(p["weight"].to(dtype) * p["weight_scale"].float().reshape(())).div(wmax)
                      .to(torch.float8_e4m3fn) for p in parts]}
    if all("input_scale" in p for p in parts):
        out["activation_scaling_factor"] = torch.stack(
            [p["input_scale"].float().reshape(()) for p in parts]).max().reshape(1)
    return out


def _shared(parts: list[dict], key: str, where: str) -> Tensor | None:
    vals = [p.get(key) for p in parts]
    if all(v is None for v in vals):
        return None
    # meta tensors (the lazy reader's names, shapes only) have no values: compared when read
    if any(v is None or not (v.is_meta or torch.equal(v, vals[0])) for v in vals):
        raise UserError(f"{where}: {key} differs between the fused linears; the checkpoint was not "
                        "exported with modelopt's shared-input fusion")
    return vals[0]


def _fuse(parts: list[dict], fmt, dtype: torch.dtype, where: str) -> dict:
    """One TRT-LLM module from linears that share an input (q/k/v; gate and up for FP8)."""
    out = _fp8_fuse(parts, dtype) if fmt.per_tensor_weight_scale else \
        {"weight": [p["weight"] for p in parts]}
    if "bias" in parts[0]:  # q/k/v biases (Qwen2, Qwen2-MoE): float, fused as the weights
        out["bias"] = [p["bias"] for p in parts]
    if fmt.per_tensor_weight_scale:
        return out
    if "weight_scale" in parts[0]:
        out["weights_scaling_factor"] = [p["weight_scale"] for p in parts]
    for key in SCALARS:  # W4A8_AWQ's weight_scale_2 too: modelopt unified them over the group
        a = _shared(parts, key, where)
        if a is not None:
            out[SUFFIXES[key]] = a.float().reshape(1)
    pqs = _shared(parts, "pre_quant_scale", where)
    if pqs is not None:
        out["prequant_scaling_factor"] = pqs
    elif fmt.fold_into_norm:  # folded into the norm by the export: identity here
        out["prequant_scaling_factor"] = torch.ones(parts[0]["weight"].shape[1], dtype=dtype)
    return out


def _single(p: dict, fmt, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in p.items():
        if k in ("k_scale", "v_scale"):
            continue
        if k not in SUFFIXES:
            raise UserError(f"unexpected tensor suffix {k!r} in a unified checkpoint")
        out[SUFFIXES[k]] = v.float().reshape(1) if k in SCALARS or (
            k == "weight_scale" and fmt.per_tensor_weight_scale) else v
    if fmt.fold_into_norm and "prequant_scaling_factor" not in out and "weight" in out \
            and not out["weight"].is_floating_point():
        out["prequant_scaling_factor"] = torch.ones(out["weight"].shape[1], dtype=dtype)
    return out


def load_unified(ckpt_dir) -> tuple[dict, list[dict[str, Tensor]]]:
    """(TRT-LLM config.json dict, [rank-0 tensors]) of a unified HF checkpoint, at tp 1, read whole
    (verify/unified_lazy.py reads the same mapping one layer at a time)."""
    m = UnifiedMap(ckpt_dir)
    tensors = _read_tensors(m.dir)
    global_names, layers = m.split(tensors)
    out = {tn: m.global_tensor(un, tensors[un]) for tn, un in m.global_sources(global_names).items()}
    for i, mods in sorted(layers.items()):
        out.update(m.layer(i, {mod: {k: tensors[n] for k, n in sfx.items()} for mod, sfx in mods.items()}))
    return m.config, [out]


class UnifiedMap:
    """How a unified checkpoint's tensors become the TensorRT-LLM tp-1 checkpoint's: its config
    (read once), its global tensors (embedding, final norm, head) and each decoder layer on its
    own, so that the whole reader and the layer-by-layer one share one mapping."""

    def __init__(self, ckpt_dir):
        from convert.hf_config import from_hugging_face
        from model.config import read_hf_config
        from model.shape import model_shape

        self.dir = d = Path(ckpt_dir)
        self.quant = _trtllm_quantization(d)
        hf = read_hf_config(d)
        self.family = FAMILIES[ARCHITECTURES[hf.architectures[0]]]
        if self.family.moe is not None and "exclude_modules" in self.quant:
            # the routers and Qwen2-MoE's shared_expert_gate stay float (modelopt lists them)
            self.quant["exclude_modules"] += ["*" + _module(r.target, TRT_LAYER) for r in
                                              self.family.extra]
        self.config = from_hugging_face(hf, dtype="auto", tp=1, pp=1, quantization=self.quant)
        self.qkv = self.family.linear("attention.qkv")
        # fused HF modules whose parts the TRT-LLM linear takes in another order (Phi-3's
        # gate_up_proj [gate; up] -> mlp.fc [up; gate]): {module: (part sizes, order)}
        shape = model_shape(hf)
        self.reorder = {lin.hf[0]: ([DIMS[o](shape) for o, _ in lin.shapes], lin.fused)
                        for lin in self.family.dense_linears()
                        if lin.fused and list(lin.fused) != sorted(lin.fused)}
        # the family's linears and norms, its per-head q/k norms included (Qwen3, Gemma 3)
        self.names = names_of(self.family)
        self.norms = {**self.family.norm_names(), **self.family.qk_norm_names()}
        self.dtype = _TORCH_DTYPES.get(self.config["dtype"], torch.float32)
        self.fmt = _unified(self.quant)

    def split(self, names) -> tuple[list[str], dict[int, dict[str, dict[str, str]]]]:
        """(the global tensors' names, {layer: {unified module: {suffix: name}}}) of ``names``."""
        global_names: list[str] = []
        layers: dict[int, dict[str, dict[str, str]]] = {}
        for name in names:
            if name in GLOBAL_NAMES:
                global_names.append(name)
                continue
            m = _LAYER.match(name)
            if not m:
                raise UserError(f"{self.dir}: tensor {name} is not a Llama-family unified checkpoint name")
            layers.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = name
        return global_names, layers

    def global_sources(self, names: list[str]) -> dict[str, str]:
        """{TRT-LLM tensor name: the unified tensor it is made from} of the global ``names``."""
        out = {GLOBAL_NAMES[n]: n for n in names}
        if "lm_head.weight" not in out and "transformer.vocab_embedding.weight" in out:
            out["lm_head.weight"] = out["transformer.vocab_embedding.weight"]  # tied embeddings
        return out

    def global_tensor(self, name: str, t: Tensor) -> Tensor:
        """The global tensor ``name`` as the TRT-LLM checkpoint holds it (the final norm: Gemma's
        1 + w, model.spec.Rule)."""
        return _offset(t, self.family.norm_offset) if "norm" in name else t

    def layer(self, i: int, mods: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """Layer ``i``'s TRT-LLM tensors from its unified ``{module: {suffix: tensor}}``."""
        d, fmt, dtype = self.dir, self.fmt, self.dtype
        pre, out = f"transformer.layers.{i}", {}
        qkv = [mods.get(h) for h in self.qkv.hf]
        if any(p is None or "weight" not in p for p in qkv):
            raise UserError(f"{d}: layer {i} lacks {'/'.join(self.qkv.hf)} weights")
        moe = _moe_layer(mods, fmt, d, i, self.family, dtype)  # router + stacked experts, else {}
        out.update({f"{pre}.{k}": v for k, v in moe.items()})
        gate_up = self.family.fusion_groups().get("gate_up", ())
        # TRT-LLM fuses separate gate/up modules into one under FP8: shared scales (one fused HF
        # module, Phi-3's gate_up_proj, already has one)
        fused_mlp = fmt.per_tensor_weight_scale and not moe and len(gate_up) > 1
        if fused_mlp:
            f = _fuse([mods[h] for h in gate_up], fmt, dtype, f"layer {i} mlp")
            for j, tn in enumerate(self.names[h] for h in gate_up):
                for k, v in f.items():
                    out[f"{pre}.{tn}.{k}"] = v[j] if isinstance(v, list) else v
        if len(qkv) > 1:  # one HF module (Phi-3's qkv_proj) maps as any single linear
            for k, v in _fuse(qkv, fmt, dtype, f"layer {i} {QKV.name}").items():
                out[f"{pre}.{QKV.name}.{k}"] = torch.cat(v) if isinstance(v, list) else v
        for un, tn in self.names.items():
            if un in gate_up and fused_mlp or moe and tn.startswith("mlp."):
                continue
            if un not in mods:
                raise UserError(f"{d}: layer {i} lacks {un}")
            for k, v in _single(mods[un], fmt, dtype).items():
                if un in self.reorder and k in ("weight", "bias", "weight_scale") and v.numel() > 1:
                    v = _reordered(v, *self.reorder[un])
                out[f"{pre}.{tn}.{k}"] = _offset(v, self.family.norm_offset) if un in self.norms else v
        out.update(_kv_scale(mods, self.quant, d, i))
        return out


def _reordered(v: Tensor, sizes: list[int], order) -> Tensor:
    """A fused module's output-side tensor (weight, packed int4 weight, per-row / per-group
    scales, bias) with its parts' rows, in proportion to ``sizes``, taken in ``order``."""
    rows = [s * v.shape[0] // sum(sizes) for s in sizes]
    return torch.cat([v.split(rows)[j] for j in order])


def _offset(w: Tensor, offset: float) -> Tensor:
    """A norm weight as the TRT-LLM checkpoint writes it: ``offset + w`` in float32, cast back."""
    return (w.float() + offset).to(w.dtype) if offset else w


def _read_tensors(d: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    from convert.source import SourceCheckpoint

    src = SourceCheckpoint(d)  # validates the files (index, shards, headers) with one-line errors
    files = list(src.files)
    src.close()
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:  # safetensors raises its own types for corrupt files
            raise UserError(f"cannot read {f}: {e}") from None
    return tensors


def _kv_scale(mods: dict, quant: dict, d: Path, i: int) -> dict[str, Tensor]:
    """Layer ``i``'s ``kv_cache_scaling_factor`` = max(k_scale, v_scale) (none: no KV cache), and
    ``k_cache_scaling_factor`` / ``v_cache_scaling_factor`` = k_scale / v_scale (an NVFP4 KV cache
    quantizes K and V with their own global scales)."""
    if quant["kv_cache_quant_algo"] is None:
        return {}
    ks = mods.get(QKV.hf[1], {}).get("k_scale")
    vs = mods.get(QKV.hf[2], {}).get("v_scale")
    if ks is None or vs is None:
        raise UserError(f"{d}: layer {i} lacks k_proj.k_scale / v_proj.v_scale for the "
                        f"{quant['kv_cache_quant_algo']} KV cache")
    a = f"transformer.layers.{i}.attention"
    return {f"{a}.kv_cache_scaling_factor": torch.maximum(ks.float().reshape(1), vs.float().reshape(1)),
            f"{a}.k_cache_scaling_factor": ks.float().reshape(1),
            f"{a}.v_cache_scaling_factor": vs.float().reshape(1)}


def _moe_layer(mods: dict, fmt, d: Path, i: int, family, dtype) -> dict[str, Tensor]:
    """A mixture-of-experts layer (``family.moe``: Mixtral, Qwen2-MoE, Qwen3-MoE) in the TRT-LLM
    checkpoint form the reader runs: the router (float32), the experts stacked, ``mlp.fc`` =
    [up; gate] per expert as the family's spec fuses them, ``mlp.proj`` = down, and the family's
    other MoE tensors (Qwen2-MoE's shared expert, fc = [up; gate] at tp 1, and its gate) as its
    spec names them. Quantized experts (quantize/unified/experts.py) load as TensorRT-LLM's
    PyTorch backend loads its fused MoE: each expert's up and gate fused as a dense linear's
    (FP8: their maximum weight scale, re-quantized), one input scale per projection, the
    experts' maximum. {} for a dense family."""
    if family.moe is None:
        return {}
    router_rule = next(r for r in family.extra if r.dtype == "float32")
    router = mods.get(_module(router_rule.sources[0], HF_LAYER))
    if router is None:
        raise UserError(f"{d}: layer {i} lacks {_module(router_rule.sources[0], HF_LAYER)}")
    fc, proj = family.linear("mlp.fc"), family.linear("mlp.proj")
    index = re.compile("^" + re.escape(fc.hf[-1]).replace(r"\{e\}", r"(\d+)") + "$")
    experts = sorted(int(m.group(1)) for k in mods if (m := index.match(k)))
    if experts != list(range(len(experts))) or not experts:
        raise UserError(f"{d}: layer {i} has experts {experts}, expected 0..N-1")

    def parts(names, e=None):
        got = [mods.get(h.format(e=e), {}) for h in names]
        for h, p in zip(names, got):
            if "weight" not in p:
                raise UserError(f"{d}: layer {i} lacks {h.format(e=e)}.weight")
        return got

    def linear(names, e=None):  # one TRT-LLM linear of these unified modules (tp 1)
        if len(names) == 1:
            return _single(parts(names, e)[0], fmt, dtype)
        f = _fuse(parts(names, e), fmt, dtype, f"layer {i} {names[0].format(e=e)}")
        return {k: torch.cat(v) if isinstance(v, list) else v for k, v in f.items()}

    out = {_module(router_rule.target, TRT_LAYER) + ".weight": router["weight"].float()}
    for lin in (fc, proj):
        per = [linear(lin.hf, e) for e in experts]
        for k in per[0]:
            shared = k == "activation_scaling_factor"  # one per projection: the experts' max
            out[f"{lin.name}.{k}"] = torch.stack([p[k] for p in per]).amax(0) if shared else \
                torch.stack([p[k] for p in per])
    for lin in family.dense_linears():  # the shared expert
        if lin.name.startswith("mlp."):
            out.update({f"{lin.name}.{k}": v for k, v in linear(lin.hf).items()})
    for rule in family.extra:  # the shared expert's gate
        if rule is not router_rule:
            out[_module(rule.target, TRT_LAYER) + ".weight"] = \
                parts([_module(rule.sources[0], HF_LAYER)])[0]["weight"]
    return out
