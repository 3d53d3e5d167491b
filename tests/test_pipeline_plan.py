"""pipeline.plan: one frozen BuildPlan per run, every refusal while it is made (nothing written),
and the model opened once (model.source.ModelSource)."""
from __future__ import annotations

import dataclasses

import pytest

from builders.cli_args import build_parser
from common.errors import UserError
from model.source import ModelSource
from pipeline.plan import BuildPlan, make_plan


def _plan(*argv) -> BuildPlan:
    return make_plan(build_parser().parse_args(list(argv)))


def test_plan_is_typed_frozen_and_carries_the_model(tiny_model, tmp_path):
    hf_dir, _ = tiny_model()
    plan = _plan("--model", str(hf_dir), "--output", str(tmp_path / "out"), "--tp", "2",
                 "--checkpoint-only")
    assert plan.target == "engine" and isinstance(plan.model, ModelSource)
    assert plan.layout.tp == 2 and plan.layout.shape.heads == plan.model.shape.heads
    assert plan.engine_options is None and plan.triton_options is None  # --checkpoint-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.force = True
    assert not (tmp_path / "out").exists()  # making the plan writes nothing


def test_refusals_happen_while_the_plan_is_made(tiny_model, tmp_path):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    with pytest.raises(UserError, match="cannot split this model over tp 3"):
        _plan("--model", str(hf_dir), "--output", str(out), "--tp", "3", "--checkpoint-only")
    with pytest.raises(UserError, match="--calibration applies to calibrated formats"):
        _plan("--model", str(hf_dir), "--output", str(out), "--calibration", str(tmp_path),
              "--checkpoint-only")
    assert not out.exists()


def test_model_source_parses_config_once(tiny_model, monkeypatch):
    import model.config as mc

    hf_dir, _ = tiny_model()
    calls = []
    real = mc.read_config
    monkeypatch.setattr(mc, "read_config", lambda d: calls.append(d) or real(d))
    import model.source as ms

    monkeypatch.setattr(ms, "read_config", mc.read_config)
    src = ModelSource.open(hf_dir)
    assert len(calls) == 1
    assert src.shape.layers == src.config.num_hidden_layers and src.raw["architectures"]
