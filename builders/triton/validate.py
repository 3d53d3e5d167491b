"""Validation of a written Triton model repository against Triton's schema and wiring rules."""
from __future__ import annotations

import re
from pathlib import Path

from builders.triton.llmapi_schema import check_llmapi_model_yaml
from builders.triton.model_config import model_config_pb2, parse_config
from common.errors import UserError

_PLACEHOLDER = re.compile(r"\$\{[^}]*\}?")


def _dims_fit(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _check_ensemble(name: str, ens, models: dict) -> None:
    pb2 = model_config_pb2()
    tname = lambda t: pb2.DataType.Name(t)  # noqa: E731
    where = f"{name}/config.pbtxt"
    tensors = {t.name: (t.data_type, list(t.dims), "ensemble input") for t in ens.input}
    steps = list(ens.ensemble_scheduling.step)
    if not steps:
        raise UserError(f"{where}: ensemble_scheduling has no steps")
    for i, step in enumerate(steps):  # every produced tensor first (steps need not be ordered)
        m = models.get(step.model_name)
        if m is None:
            raise UserError(f"{where}: step {i} uses model '{step.model_name}', which is not in "
                            f"the repository")
        outs = {t.name: t for t in m.output}
        for key, value in step.output_map.items():
            if key not in outs:
                raise UserError(f"{where}: step {i} maps output '{key}' of '{step.model_name}', "
                                f"which has no such output")
            if value in tensors:
                raise UserError(f"{where}: ensemble tensor '{value}' is produced twice")
            tensors[value] = (outs[key].data_type, list(outs[key].dims),
                              f"output {key} of {step.model_name}")
    used = set()
    for i, step in enumerate(steps):
        m = models[step.model_name]
        if m.max_batch_size < ens.max_batch_size:
            raise UserError(f"{where}: max_batch_size {ens.max_batch_size} exceeds that of "
                            f"'{step.model_name}' ({m.max_batch_size})")
        ins = {t.name: t for t in m.input}
        for key, value in step.input_map.items():
            if key not in ins:
                raise UserError(f"{where}: step {i} feeds input '{key}' of '{step.model_name}', "
                                f"which has no such input")
            if value not in tensors:
                raise UserError(f"{where}: step {i} reads tensor '{value}', which is neither an "
                                f"ensemble input nor produced by a step")
            dtype, dims, src = tensors[value]
            if dtype != ins[key].data_type:
                raise UserError(f"{where}: '{value}' ({src}) is {tname(dtype)} but input '{key}' "
                                f"of '{step.model_name}' is {tname(ins[key].data_type)}")
            if not _dims_fit(dims, list(ins[key].dims)):
                raise UserError(f"{where}: '{value}' ({src}) has dims {dims} but input '{key}' of "
                                f"'{step.model_name}' has dims {list(ins[key].dims)}")
            used.add(value)
        unfed = [t.name for t in m.input if not t.optional and t.name not in step.input_map]
        if unfed:
            raise UserError(f"{where}: required input(s) {', '.join(unfed)} of "
                            f"'{step.model_name}' are not fed by step {i}")
    for t in ens.input:
        if t.name not in used:
            raise UserError(f"{where}: ensemble input '{t.name}' is not used by any step")
    for t in ens.output:
        src = tensors.get(t.name)
        if src is None or src[2] == "ensemble input":
            raise UserError(f"{where}: ensemble output '{t.name}' is not produced by any step")
        if src[0] != t.data_type:
            raise UserError(f"{where}: ensemble output '{t.name}' is {tname(t.data_type)} but "
                            f"{src[2]} is {tname(src[0])}")


def validate_repo(path) -> dict:
    """Validate a Triton model repository; return {model name: ModelConfig message}.

    Every ``<model>/config.pbtxt`` is parsed with Triton's ModelConfig protobuf schema (from
    tritonclient); no ``${...}`` placeholder may remain; each model has a numeric version dir
    (with model.py for the Python backend), unique tensor names and a name matching its dir;
    ensemble steps must reference models, inputs and outputs that exist, with matching data
    types and shapes, feed every required input and use every ensemble input; a model.yaml
    (LLM-API) must use known keys only. Raises UserError with one line on the first problem.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected a Triton model repository)")
    models = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        models[d.name] = _validate_model_dir(d)
    if not models:
        raise UserError(f"{root}: no model directories (expected e.g. ensemble/, tensorrt_llm/)")
    for name, cfg in models.items():
        if cfg.platform == "ensemble":
            _check_ensemble(name, cfg, models)
    return models


def _validate_model_dir(d: Path):
    """One model directory: its config.pbtxt parsed and checked, its versions, its model.yaml."""
    cfg_path = d / "config.pbtxt"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing; every model directory needs a config.pbtxt")
    text = cfg_path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        m = None if line.lstrip().startswith("#") else _PLACEHOLDER.search(line)
        if m:
            raise UserError(f"{cfg_path}:{lineno}: unfilled template placeholder "
                            f"{m.group(0)}")
    cfg = parse_config(text, str(cfg_path))
    if cfg.name and cfg.name != d.name:
        raise UserError(f"{cfg_path}: name '{cfg.name}' differs from its directory "
                        f"'{d.name}'")
    if not cfg.backend and not cfg.platform:
        raise UserError(f"{cfg_path}: neither backend nor platform is set")
    versions = [v for v in d.iterdir() if v.is_dir() and v.name.isdigit()]
    if not versions:
        raise UserError(f"{d}: no version directory (e.g. {d.name}/1)")
    if cfg.backend == "python":
        for v in versions:
            if not (v / "model.py").is_file():
                raise UserError(f"{v}: model.py missing (Python backend)")
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        seen = set()
        for t in tensors:
            if t.name in seen:
                raise UserError(f"{cfg_path}: {kind} '{t.name}' is declared twice")
            seen.add(t.name)
    for v in versions:
        yml = v / "model.yaml"
        if yml.is_file():
            import yaml

            try:
                data = yaml.safe_load(yml.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise UserError(f"{yml}: not valid YAML ({' '.join(str(e).split())})") from None
            check_llmapi_model_yaml(data, str(yml), cfg)
    return cfg
