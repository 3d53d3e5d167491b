"""README's family x format x target grid (tools/support_grid.py): every cell is asked of the
planner (pipeline.plan.make_plan, no weights read, nothing calibrated), every accepted cell has
its tests (tests/support_cells.py) and every named test exists, every refused cell refuses on the
command line (one line, exit 2, nothing written), and README shows exactly that grid."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import support_grid as grid  # noqa: E402
from support_cells import ORACLES, TESTS, UNTESTED, by_cell  # noqa: E402


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """(family -> probe model dir, (family, format, target) -> None | the refusal line)."""
    models = grid.make_probe_models(tmp_path_factory.mktemp("probe"))
    return models, grid.probe_all(models)


def test_rows_are_every_architecture_the_tool_accepts():
    from model.families import ARCHITECTURES

    assert sorted(arch for _, _, arch in grid.ROWS) == sorted(ARCHITECTURES)
    assert len({f for f, _, _ in grid.ROWS}) == len(grid.ROWS)


def test_each_probe_model_is_its_row_s_architecture(probed):
    import json

    models, _ = probed
    for family, _, arch in grid.ROWS:
        assert json.loads((models[family] / "config.json").read_text())["architectures"] == [arch]


def test_every_accepted_cell_has_a_test_and_no_test_names_a_refused_cell(probed):
    _, verdicts = probed
    accepted = {cell for cell, why in verdicts.items() if why is None}
    tested = set(by_cell())
    families, formats = {f for f, _, _ in grid.ROWS}, {f for f, _, _ in grid.FORMATS}
    for t in TESTS:
        assert t.family in families and t.fmt in formats and t.target in grid.TARGETS, t
        assert t.oracle in ORACLES, t
    assert not sorted(accepted - tested - set(UNTESTED)), "accepted cells without a test"
    assert not sorted(tested - accepted), "tests listed for cells the tool refuses"
    assert not sorted(set(UNTESTED) - accepted), "UNTESTED names cells the tool refuses"
    assert not sorted(set(UNTESTED) & tested), "UNTESTED names cells that have a test now"


def test_every_listed_node_id_is_collected():
    """pytest's own collection of the files named (a node id with [...] names one parameter,
    one without names the test function, whatever its parameters)."""
    files = sorted({t.node.split("::")[0] for t in TESTS})
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *files], cwd=REPO / "tests",
                         capture_output=True, text=True, timeout=600)
    collected = {line.strip().removeprefix("tests/") for line in run.stdout.splitlines()
                 if "::" in line}
    functions = {n.split("[")[0] for n in collected}
    missing = [t.node for t in TESTS if t.node not in collected and t.node not in functions]
    assert not missing, (missing, run.stderr[-2000:])


def test_refused_cells_refuse_on_the_command_line(probed, tmp_path, capsys, monkeypatch):
    """Each refused cell through the CLI: exit 2, exactly the probe's line, nothing written."""
    from convert_helper import refused

    models, verdicts = probed
    monkeypatch.setattr("pipeline.preflight._host_gpu", lambda: (None, None))
    cells = [(cell, why) for cell, why in verdicts.items() if why is not None]
    assert len(cells) > 50  # the grid refuses what it should (see README)
    for (family, fmt, target), why in cells:
        out = tmp_path / f"{family}-{fmt}-{target}"
        line = refused(capsys, grid.argv(models[family], fmt, target), out)
        assert line == f"build_engine: error: {why}", (family, fmt, target)


def test_probe_sees_both_verdicts(probed):
    """The instrument: a cell the docs call refused is refused, one they call tested is accepted."""
    _, verdicts = probed
    assert verdicts[("llama", "fp8", "engine")] is None
    assert "no format of it is proven there" in verdicts[("deepseek_v2", "float", "pytorch")]


def test_readme_grid_is_generated(probed):
    _, verdicts = probed
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert grid.readme_block(text) == grid.render(verdicts, by_cell()), \
        "README's support grid is stale: run python tools/support_grid.py --write"
