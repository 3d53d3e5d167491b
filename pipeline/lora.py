"""``--lora DIR ...``: the adapters' refusals (in the plan, before any work), the engine's LoRA
settings, and the conversion of each adapter to ``OUTPUT/lora/<task id>/`` (convert/lora.py).

Task ids are 1, 2, ... in the order of ``--lora`` (Triton's ``lora_task_id``; 0 is left unused).
The engine gets TensorRT-LLM's LoRA plugin in its own dtype, ``lora_target_modules`` = the union
of the adapters' modules with q/k/v completed (model.lora.target_modules) and ``max_lora_rank`` =
``--max-lora-rank`` or the largest rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

LORA_DIR = "lora"


@dataclass(frozen=True)
class LoraPlan:
    adapters: tuple          # model.lora.Adapter, task ids 1..N
    dtype: str               # the engine's dtype: the adapters' rows and the plugin's
    max_rank: int
    target_modules: tuple[str, ...]

    def record(self) -> dict:
        """build.json's "lora"."""
        return {"dir": LORA_DIR, "dtype": self.dtype, "max_lora_rank": self.max_rank,
                "lora_target_modules": list(self.target_modules),
                "adapters": [a.record() for a in self.adapters]}


def refuse_layout(model, layout, quant) -> None:
    """What the LoRA rows cannot be laid out for: experts, padded MLP / hidden features, the
    formats whose TensorRT-LLM linears have no LoRA branch (the capability table's LoRA cells of
    the engine flow, check/gpu.py, applied on the PyTorch target too: not verified there);
    ``layout`` None: the PyTorch target (TensorRT-LLM splits the HF checkpoint itself)."""
    from check.gpu import lora_cell

    cell = lora_cell(getattr(quant, "quant_algo", None))
    if cell is not None:
        raise UserError(f"--lora with {quant.name}: {cell.what}; {cell.fix}; LoRA runs on float, "
                        f"weight-only / AWQ and FP8 (per-tensor) linears ({cell.source})")
    shape = model.shape if layout is None else layout.shape
    if shape.experts:
        raise UserError(f"--lora: {model.shape.family} is a mixture of experts; TensorRT-LLM's "
                        f"expert LoRA modules are not supported here (dense models only)")
    if layout is not None and (shape.padded_inter or shape.padded_hidden):
        raise UserError(f"--lora with {quant.name} at tp {layout.tp}: the checkpoint pads the "
                        f"MLP / hidden features for TensorRT-LLM's weight-only GEMMs, which the "
                        f"engine's LoRA modules do not; use a --tp that needs no padding, or "
                        f"another format")


def plan_lora(args, model, layout, quant) -> LoraPlan | None:
    """The adapters of --lora checked against the base model (one line, exit 2), or None."""
    dirs = getattr(args, "lora", None)
    max_rank = getattr(args, "max_lora_rank", None)
    if getattr(args, "lora_plugin", None) or getattr(args, "lora_target_modules", None):
        raise UserError("--lora-plugin / --lora-target-modules apply with --from-checkpoint; "
                        "with --model, --lora DIR ... sets them from the adapters")
    if not dirs:
        if max_rank is not None:
            raise UserError("--max-lora-rank applies with --lora: add the adapters or drop it")
        return None
    from convert.hf_config import resolve_dtype
    from model.families import FAMILIES
    from model.lora import read_adapter, target_modules

    if max_rank is not None and max_rank < 1:
        raise UserError(f"--max-lora-rank must be a whole number >= 1 (got {max_rank})")
    seen = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen:
            raise UserError(f"--lora {d} is given twice (task ids {seen[key]} and "
                            f"{len(seen) + 1}); give each adapter once")
        seen[key] = len(seen) + 1
    refuse_layout(model, layout, quant)
    family = FAMILIES[model.shape.family]
    adapters = tuple(read_adapter(d, i, family, model.shape, max_rank)
                     for i, d in enumerate(dirs, 1))
    if getattr(args, "verify", False) and layout is not None:
        _need_peft()
    rank = max_rank if max_rank is not None else max(a.rank for a in adapters)
    return LoraPlan(adapters, resolve_dtype(args.dtype, model.config), rank,
                    tuple(target_modules(adapters)))


def from_checkpoint_options(args, options, config: dict):
    """--from-checkpoint with --lora-plugin / --lora-target-modules / --max-lora-rank (the
    settings a --lora run prints in its engine command): the engine options with them."""
    from model.lora import MODULE_IDS

    plugin = getattr(args, "lora_plugin", None)
    modules = getattr(args, "lora_target_modules", None)
    rank = getattr(args, "max_lora_rank", None)
    if plugin is None:
        if modules is not None or rank is not None:
            raise UserError("--lora-target-modules / --max-lora-rank need --lora-plugin DTYPE")
        return options
    if plugin != config.get("dtype"):
        raise UserError(f"--lora-plugin {plugin} differs from the checkpoint's dtype "
                        f"{config.get('dtype')}: TensorRT-LLM checks that a request's LoRA "
                        f"weights have the model's dtype; use --lora-plugin {config.get('dtype')}")
    bad = [m for m in modules or () if m not in MODULE_IDS]
    if not modules or bad:
        raise UserError(f"--lora-plugin needs --lora-target-modules from "
                        f"{', '.join(MODULE_IDS)} (got {' '.join(bad) or 'none'})")
    if rank is None or rank < 1:
        raise UserError("--lora-plugin needs --max-lora-rank N (N >= 1)")
    if options is None:
        return None
    out = dataclasses.replace(options, lora_plugin=plugin, max_lora_rank=rank,
                              lora_target_modules=tuple(modules))
    out.validate()
    return out


def _need_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise UserError("--verify with --lora compares each adapter with HF + PEFT, and peft is "
                        "not installed: pip install peft (or drop --verify)")


def engine_options(options, lora: LoraPlan | None):
    """The engine options with the LoRA plugin's settings (unchanged without --lora)."""
    if lora is None or options is None:
        return options
    out = dataclasses.replace(options, lora_plugin=lora.dtype, max_lora_rank=lora.max_rank,
                              lora_target_modules=lora.target_modules)
    out.validate()
    return out


def convert_step(lora: LoraPlan, model, layout, out: Path, timings: dict) -> Path:
    """Each adapter to ``out``/lora.partial/<task id>/ (one module at a time); the directory.
    Put in place with the checkpoint (:func:`put_in_place`)."""
    import time

    from common.dtypes import BY_NAME
    from convert.lora import convert_adapter
    from model.families import FAMILIES

    from common import ownership

    t0 = time.perf_counter()
    staged = Path(out) / (LORA_DIR + ".partial")
    ownership.remove_owned(staged)
    staged.mkdir(parents=True)
    ownership.mark_stage(staged)
    family = FAMILIES[model.shape.family]
    for a in lora.adapters:
        convert_adapter(a, family, layout.shape, layout.tp, BY_NAME[lora.dtype],
                        staged / str(a.task_id))
    timings["lora"] = time.perf_counter() - t0
    print(f"lora: {len(lora.adapters)} adapter(s) converted for the engine "
          f"({lora.dtype}, max_lora_rank {lora.max_rank}, modules "
          f"{' '.join(lora.target_modules)}) in {timings['lora']:.1f}s")
    return staged


def put_in_place(staged: Path) -> Path:
    """``lora.partial`` -> ``lora`` (an earlier one of the tool's goes), recorded as the tool's
    finished output (common.ownership)."""
    from common import ownership

    final = staged.with_name(LORA_DIR)
    ownership.remove_owned(final)
    staged.rename(final)
    ownership.forget(staged)
    ownership.mark_finished(final)
    return final


def copy_step(lora: LoraPlan, out: Path) -> Path:
    """--target pytorch: each adapter as TensorRT-LLM's LLM API loads it (a PEFT directory:
    adapter_config.json + adapter_model.safetensors, as given) into ``out``/lora.partial/<task
    id>/; put in place with :func:`put_in_place`."""
    import shutil

    from common import ownership

    staged = Path(out) / (LORA_DIR + ".partial")
    ownership.remove_owned(staged)
    staged.mkdir(parents=True)
    ownership.mark_stage(staged)
    for a in lora.adapters:
        d = staged / str(a.task_id)
        d.mkdir()
        shutil.copy2(a.directory / "adapter_config.json", d / "adapter_config.json")
        shutil.copy2(a.weights, d / "adapter_model.safetensors")
    print(f"lora: {len(lora.adapters)} PEFT adapter(s) laid out for the LLM API (LoraConfig "
          f"max_lora_rank {lora.max_rank}, max_loras {len(lora.adapters)})")
    return staged


def llm_api_lora_config(lora: LoraPlan, out: Path) -> dict:
    """model.yaml's ``lora_config`` (TensorRT-LLM's LoraConfig: lora_dir, max_lora_rank,
    max_loras, max_cpu_loras): every adapter resident."""
    n = len(lora.adapters)
    return {"lora_dir": [str((Path(out) / LORA_DIR / str(a.task_id)).absolute())
                         for a in lora.adapters],
            "max_lora_rank": lora.max_rank, "max_loras": n, "max_cpu_loras": n}
