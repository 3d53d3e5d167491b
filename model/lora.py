"""PEFT LoRA adapters against a base model's family spec, read before any work (adapter_config.json
and the safetensors header; no weight is read here).

TensorRT-LLM's names (``tensorrt_llm/lora_manager.py``): ``LoraManager.LORA_MODULE_IDS`` numbers
the modules, ``get_default_trtllm_modules_to_hf_modules`` maps them to HF modules. The trap:
``mlp_h_to_4h`` is HF ``gate_proj`` (the activated branch, TensorRT-LLM's ``mlp.fc``) and
``mlp_gate`` is ``up_proj`` (``mlp.gate``). Here the mapping is read off the family spec: each
TensorRT-LLM linear's HF sources, in fused order, get that linear's LoRA modules. The module
dimensions are those of ``LoraModule::createLoraModules`` (cpp/tensorrt_llm/runtime/loraModule.cpp):
global sizes (per-rank x tp); ``attn_dense`` and ``mlp_4h_to_h`` split A's input columns over the
tp ranks (inTpSplitDim 1), the others split B's output rows (outTpSplitDim 0).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.dtypes import BY_ST, DType
from common.errors import UserError
from common.safetensors_header import read_header, tensor_span

#: LoraManager.LORA_MODULE_IDS (the dense decoder modules)
MODULE_IDS = {"attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4,
              "mlp_h_to_4h": 5, "mlp_4h_to_h": 6, "mlp_gate": 7}
#: each TensorRT-LLM linear's LoRA modules, one per HF source in fused order
LINEAR_MODULES = {"attention.qkv": ("attn_q", "attn_k", "attn_v"),
                  "attention.dense": ("attn_dense",), "mlp.fc": ("mlp_h_to_4h",),
                  "mlp.gate": ("mlp_gate",), "mlp.proj": ("mlp_4h_to_h",)}
#: row-parallel modules: A's input columns are split over tp; the others split B's output rows
SPLIT_IN = frozenset({"attn_dense", "mlp_4h_to_h"})
QKV = ("attn_q", "attn_k", "attn_v")
FLOAT_DTYPES = ("F16", "BF16", "F32")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Target:
    """One HF module an adapter may target: its TensorRT-LLM linear and LoRA module."""

    hf: str            # "self_attn.q_proj"
    linear: str        # "attention.qkv"
    module: str        # "attn_q"
    dims: tuple[str, str]  # HF (out, in) in model.spec.DIMS names


def targets(family) -> dict[str, Target]:
    """The family's LoRA targets by HF module path (experts and unknown linears have none)."""
    out = {}
    for lin in family.linears:
        mods = LINEAR_MODULES.get(lin.name)
        if lin.experts or mods is None:
            continue
        for hf, module, dims in zip(lin.hf, mods, lin.shapes):
            out[hf] = Target(hf, lin.name, module, dims)
    return out


def module_dims(module: str, shape, tp: int) -> tuple[int, int]:
    """(in, out) features of a LoRA module as the engine declares them (global: per-rank x tp;
    heads padded, a duplicated kv head counted on every rank, as createLoraModules does)."""
    hd = shape.head_size
    hidden, inter = shape.tp_hidden, shape.tp_inter
    q = shape.tp_heads * hd
    kv = max(shape.tp_kv_heads // tp, 1) * tp * hd
    return {"attn_q": (hidden, q), "attn_k": (hidden, kv), "attn_v": (hidden, kv),
            "attn_dense": (q, hidden), "mlp_h_to_4h": (hidden, inter),
            "mlp_gate": (hidden, inter), "mlp_4h_to_h": (inter, hidden)}[module]


@dataclass(frozen=True)
class Adapter:
    """One PEFT LoRA adapter, checked against the base model (``read_adapter``)."""

    directory: Path
    task_id: int
    rank: int
    alpha: float
    rslora: bool
    dtype: DType
    weights: Path
    #: (layer, HF module path) -> (lora_A name, lora_B name) in ``weights``
    tensors: dict
    modules: tuple[str, ...]  # TensorRT-LLM module names, in MODULE_IDS order

    @property
    def scale(self) -> float:
        """alpha / r, or rsLoRA's alpha / sqrt(r) (PEFT's LoraLayer.update_layer)."""
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.tensors})

    def record(self) -> dict:
        return {"task_id": self.task_id, "dir": str(self.directory), "rank": self.rank,
                "alpha": self.alpha, "use_rslora": self.rslora, "scale": self.scale,
                "dtype": self.dtype.torch_name, "modules": list(self.modules)}


def _config(d: Path) -> dict:
    path = d / "adapter_config.json"
    if not d.is_dir():
        raise UserError(f"--lora {d}: not a directory (a PEFT adapter directory: "
                        f"adapter_config.json + adapter_model.safetensors)")
    if not path.is_file():
        raise UserError(f"--lora {d}: no adapter_config.json (a PEFT adapter directory: "
                        f"save it with PeftModel.save_pretrained)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--lora {d}: adapter_config.json is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--lora {d}: adapter_config.json is not a JSON object")
    return cfg


def _weights_file(d: Path) -> Path:
    st = d / "adapter_model.safetensors"
    if st.is_file():
        return st
    if (d / "adapter_model.bin").is_file():
        raise UserError(f"--lora {d}: adapter_model.bin is a pickle, which is not loaded (it can "
                        f"run code); save the adapter as safetensors (PeftModel.save_pretrained("
                        f"..., safe_serialization=True))")
    raise UserError(f"--lora {d}: no adapter_model.safetensors")


def _refuse_config(d: Path, cfg: dict, max_rank: int | None) -> None:
    """The adapter_config.json fields TensorRT-LLM's LoRA rows cannot express."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--lora {d}: peft_type {cfg.get('peft_type')} is not LORA")
    if cfg.get("use_dora"):
        raise UserError(f"--lora {d}: DoRA adapters (use_dora) are not supported: TensorRT-LLM "
                        f"1.2's LoRA plugin rows carry no magnitude vector; merge it into the "
                        f"model (merge_and_unload) and build that model instead")
    if cfg.get("modules_to_save"):
        raise UserError(f"--lora {d}: modules_to_save {cfg['modules_to_save']} replace whole "
                        f"modules, which TensorRT-LLM writes into the engine at build time (one "
                        f"engine per such adapter, silently); merge it (merge_and_unload) and "
                        f"build that model instead")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UserError(f"--lora {d}: {key} (per-module ranks or alphas) is not supported: "
                            f"one r and lora_alpha for the whole adapter")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"--lora {d}: bias {cfg['bias']!r} trains biases, which TensorRT-LLM's "
                        f"LoRA rows cannot carry (bias must be 'none')")
    if cfg.get("fan_in_fan_out"):
        raise UserError(f"--lora {d}: fan_in_fan_out (Conv1D layers) is not a Llama-style "
                        f"linear adapter")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise UserError(f"--lora {d}: r must be a whole number >= 1 (got {r!r})")
    if max_rank is not None and r > max_rank:
        raise UserError(f"--lora {d}: rank {r} is above --max-lora-rank {max_rank}; raise "
                        f"--max-lora-rank to {r} or more")


def read_adapter(d, task_id: int, family, shape, max_rank: int | None = None) -> Adapter:
    """``d`` checked against the base model (``family``: model.spec.Family, ``shape``: its
    unpadded model.shape.Shape); one line naming what is wrong, before any work."""
    from model.spec import DIMS

    d = Path(d)
    cfg = _config(d)
    _refuse_config(d, cfg, max_rank)
    weights = _weights_file(d)
    header, _ = read_header(weights)
    table, r = targets(family), cfg["r"]
    found, dtypes = {}, set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        m = _KEY.match(name)
        if m is None:
            raise UserError(f"--lora {d}: tensor {name} is not a LoRA A/B weight of a decoder "
                            f"layer's linear (DoRA magnitudes, embeddings and lm_head are not "
                            f"supported)")
        layer, hf, ab = int(m.group(1)), m.group(2), m.group(3)
        target = table.get(hf)
        if target is None:
            raise UserError(f"--lora {d}: module {hf} is not a LoRA target of {family.name} "
                            f"(supported: {', '.join(sorted(h.rpartition('.')[2] for h in table))})")
        if layer >= shape.layers:
            raise UserError(f"--lora {d}: {name}: layer {layer}, but the base model has "
                            f"{shape.layers} layers")
        _, _, dtype = tensor_span(weights, name, info)
        dtypes.add(dtype.st)
        out, inp = (DIMS[x](shape) for x in target.dims)
        want = [r, inp] if ab == "A" else [out, r]
        if info["shape"] != want:
            raise UserError(f"--lora {d}: {name} has shape {info['shape']}, the base model "
                            f"needs {want} (r {r}; is this adapter for another model?)")
        found.setdefault((layer, hf), {})[ab] = name
    return _adapter(d, cfg, task_id, weights, found, dtypes, table)


def _adapter(d, cfg, task_id, weights, found, dtypes, table) -> Adapter:
    if not found:
        raise UserError(f"--lora {d}: adapter_model.safetensors holds no LoRA weights")
    for key, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"--lora {d}: layer {key[0]} {key[1]} has lora_{next(iter(pair))} "
                            f"without its pair")
    bad = dtypes - set(FLOAT_DTYPES)
    if bad or len(dtypes) > 1:
        raise UserError(f"--lora {d}: LoRA weights must all be one of float16, bfloat16, "
                        f"float32 (got {', '.join(sorted(dtypes))})")
    modules = {table[hf].module for _, hf in found}
    return Adapter(d, task_id, cfg["r"], float(cfg.get("lora_alpha", 8)),
                   bool(cfg.get("use_rslora", False)), BY_ST[dtypes.pop()], weights,
                   {k: (v["A"], v["B"]) for k, v in sorted(found.items())},
                   tuple(m for m in MODULE_IDS if m in modules))


def target_modules(adapters) -> list[str]:
    """lora_target_modules for the engine: the union of the adapters' modules, with the missing
    ones of q/k/v added (TensorRT-LLM zero-fills them: LoraManager.get_missing_qkv_modules)."""
    mods = {m for a in adapters for m in a.modules}
    if mods & set(QKV):
        mods |= set(QKV)
    return [m for m in MODULE_IDS if m in mods]
