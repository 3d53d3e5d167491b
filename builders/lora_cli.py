"""``build_engine lora OUTPUT --lora DIR [DIR ...]``: convert more PEFT adapters for the engines an
earlier ``build_engine --lora ...`` run wrote into OUTPUT, without rebuilding anything.

What the engines were built for comes from OUTPUT/build.json (the model, tp / pp, head padding,
and its "lora" record: the LoRA plugin's dtype, ``lora_target_modules``, ``max_lora_rank``). Each
adapter is checked against the base model and against those engine settings (a module the engine
has no LoRA slot for, or a rank above its max_lora_rank, is refused: one line, exit 2, nothing
written), then converted into OUTPUT/lora/<task id>/ with the next free task ids.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engine lora",
                                description="Convert PEFT LoRA adapters for the LoRA engines of an "
                                            "earlier build_engine --lora run (OUTPUT/lora/<task "
                                            "id>/: model.lora_weights.npy, model.lora_config.npy)")
    p.add_argument("output", type=Path, help="the earlier run's --output directory")
    p.add_argument("--lora", nargs="+", type=Path, required=True, metavar="DIR",
                   help="PEFT adapter directories (adapter_config.json + "
                        "adapter_model.safetensors)")
    return p


def _build_record(out: Path) -> dict:
    path = out / "build.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: give the --output directory of a build_engine --lora "
                        f"run") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); rerun the build") from None
    lora = (data.get("options") or {}).get("lora")
    if not isinstance(lora, dict):
        raise UserError(f"{out}: its engines were built without the LoRA plugin (build.json has "
                        f"no lora record); rebuild with build_engine --lora DIR ...")
    return data


def add_adapters(out: Path, dirs) -> list[dict]:
    """Check and convert ``dirs`` for OUTPUT's LoRA engines; their records."""
    from common import ownership
    from convert.lora import convert_adapter
    from common.dtypes import BY_NAME
    from model.families import FAMILIES
    from model.lora import read_adapter
    from model.source import ModelSource
    from pipeline.checkpoint import plan_layout

    data = _build_record(out)
    options, lora = data["options"], data["options"]["lora"]
    if options.get("target", "engine") != "engine":
        raise UserError(f"{out} is a --target {options.get('target')} output: the LLM API loads "
                        f"PEFT directories itself; list them in its model.yaml lora_config")
    root = out / lora.get("dir", "lora")
    if ownership.foreign(root) is not None:
        raise UserError(f"{ownership.foreign(root)}: build_engine will not add to it")
    model = ModelSource.open(options["model"])
    layout = plan_layout(model, tp=int(options.get("tp", 1)), pp=int(options.get("pp", 1)),
                         pad_heads=bool(options.get("pad_heads")) or model.pads_heads)
    family, allowed = FAMILIES[model.shape.family], set(lora["lora_target_modules"])
    first = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    adapters = [read_adapter(d, first + i, family, model.shape, int(lora["max_lora_rank"]))
                for i, d in enumerate(dirs)]
    for a in adapters:
        missing = [m for m in a.modules if m not in allowed]
        if missing:
            raise UserError(f"--lora {a.directory}: the engines have no LoRA slot for "
                            f"{' '.join(missing)} (their lora_target_modules: "
                            f"{' '.join(lora['lora_target_modules'])}); rebuild them with this "
                            f"adapter among --lora")
    records = [convert_adapter(a, family, layout.shape, layout.tp, BY_NAME[lora["dtype"]],
                               root / str(a.task_id)) for a in adapters]
    ownership.mark_finished(root)
    return records


def main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        for rec in add_adapters(args.output, args.lora):
            print(f"lora: task {rec['task_id']}: {rec['dir']} (r {rec['rank']}, scale "
                  f"{rec['scale']:g}, {' '.join(rec['modules'])}) -> "
                  f"{args.output / 'lora' / str(rec['task_id'])}")
    except UserError as e:
        print(f"build_engine lora: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
