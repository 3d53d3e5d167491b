"""The capability table (check/gpu.py): every refused and warned cell is a test, the main
command checks its plan against it before any work (``--gpu``; one line, exit 2, nothing
written), build.json records the target GPU, and README's GPU matrix is the table's rendering
(tools/support_matrix.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from builders.cli import main
from check.gpu import CELLS, REFUSE, WARN, Run, broken, line, parse_gpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import support_matrix  # noqa: E402


def _breaking_run(cell) -> Run:
    """A run that breaks ``cell`` (a GPU outside its range, else the combination itself)."""
    kw = dict(target=cell.targets[0])
    if cell.field == "lora_quant_algo":
        kw.update(lora=True, quant_algo=cell.values[0])
    elif cell.field == "moe_quant_algo":
        kw.update(moe=True, quant_algo=cell.values[0])
    elif cell.field != "any":
        kw[cell.field] = cell.values[0]
    if cell.except_families is not None:  # a registered family outside the exception
        from model.families import FAMILIES

        kw["family"] = next(f for f in sorted(FAMILIES) if f not in cell.except_families)
    if cell.families is not None:  # a family the cell names
        kw["family"] = cell.families[0]
    if cell.gpu:
        kw["sm"] = cell.min_sm - 1 if cell.min_sm else cell.below_sm
    return Run(**kw)


def _holding_run(cell) -> Run:
    """The same run where the cell holds: a GPU in its range, no LoRA, or a family it names."""
    run = _breaking_run(cell)
    if cell.gpu:
        return Run(**{**run.__dict__, "sm": cell.min_sm or cell.below_sm - 1})
    if cell.field == "lora_quant_algo":
        return Run(**{**run.__dict__, "lora": False})
    if cell.families is not None:  # a family it does not name
        return Run(**{**run.__dict__, "family": "llama"})
    if cell.except_families is None:  # a format's cell of one target: it holds on the other
        return Run(**{**run.__dict__, "target": "pytorch" if cell.targets == ("engine",) else "engine"})
    return Run(**{**run.__dict__, "family": cell.except_families[0]})


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.level}-{c.field}-{c.values[0]}-{i}"
                                            for i, c in enumerate(CELLS)])
def test_every_cell_breaks_where_it_says_and_holds_elsewhere(cell):
    assert cell.level in (REFUSE, WARN) and cell.what and cell.fix and cell.source
    bad = _breaking_run(cell)
    assert cell in broken(bad), (cell.what, bad)
    assert cell not in broken(_holding_run(cell))
    if cell.gpu:  # no GPU known: no GPU cell applies
        assert cell not in broken(Run(**{**bad.__dict__, "sm": None}))
    other = "pytorch" if cell.targets == ("engine",) else "engine" if cell.targets == ("pytorch",) \
        else None
    if other:  # a cell of one target only
        assert cell not in broken(Run(**{**bad.__dict__, "target": other}))


def test_the_issue_s_combinations_are_refused_in_one_line():
    sq = [c for c in broken(Run("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", sm=100)) if c.level == REFUSE]
    assert line(sq[0], "b200", 100) == (
        "SmoothQuant (INT8) engines are refused on Blackwell (SM 100) and newer on b200 (SM 100): "
        "use --fp8 on Blackwell (tensorrt_llm/builder.py build() (issue 28))")
    fp8 = [c for c in broken(Run("FP8", sm=80)) if c.level == REFUSE]
    assert line(fp8[0], "a100", 80) == (
        "FP8 GEMMs need Ada / Hopper (SM 89) or newer on a100 (SM 80): use --awq or --smoothquant "
        "on this GPU (TensorRT-LLM support matrix; modelopt support matrix)")
    # the issue's generation facts
    assert {c.what for c in broken(Run("W4A8_AWQ", sm=86))} >= {
        "W4A8 AWQ (FP8 activations) runs on Ada / Hopper (SM 89 / 90) only"}
    assert [c.level for c in broken(Run("FP8_PER_CHANNEL_PER_TOKEN", sm=89))] == [WARN]
    assert broken(Run("FP8_PER_CHANNEL_PER_TOKEN", sm=90)) == []
    assert REFUSE in {c.level for c in broken(Run("NVFP4", sm=90))}
    assert broken(Run("NVFP4", sm=100, family="llama")) == []
    for algo in ("W8A8_SQ_PER_CHANNEL", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4"):
        assert [c.field for c in broken(Run(algo, lora=True, family="llama"))] == ["lora_quant_algo"]
    assert broken(Run("FP8", lora=True)) == [] and broken(Run("W4A16_AWQ", lora=True)) == []


#: the flags that write a quant_algo / KV cache (the CLI can be asked about these cells)
FLAGS = {"W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": ["--smoothquant"],
         "W8A8_SQ_PER_CHANNEL": ["--smoothquant", "--sq-recipe", "modelopt"],
         "FP8": ["--fp8"], "W4A16_AWQ": ["--awq"], "W4A8_AWQ": ["--awq", "--awq-act", "fp8"],
         "FP8_PER_CHANNEL_PER_TOKEN": ["--fp8-rowwise"]}
KV_FLAGS = {"INT8": ["--kv-cache-dtype", "int8"], "FP8": ["--kv-cache-dtype", "fp8"]}


def _cli_cases():
    for i, cell in enumerate(CELLS):
        if not (cell.gpu and cell.level == REFUSE) or cell.field in ("moe_quant_algo", "lora_quant_algo"):
            continue
        table = FLAGS if cell.field == "quant_algo" else KV_FLAGS
        algo = next((v for v in cell.values if v in table), None)
        if algo is not None:
            yield pytest.param(cell, table[algo], id=f"{i}-{algo}")


@pytest.mark.parametrize("cell,flags", list(_cli_cases()))
def test_cli_refuses_each_gpu_cell_in_one_line_before_any_work(tmp_path, tiny_model, capsys, cell,
                                                               flags):
    hf_dir, _ = tiny_model()
    sm = cell.min_sm - 1 if cell.min_sm else cell.below_sm
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
                 "--gpu", f"sm_{sm}", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    first = next(c for c in broken(Run(**_cli_run(flags), sm=sm)) if c.level == REFUSE)
    assert err[0] == f"build_engine: error: {line(first, f'sm_{sm}', sm)}"
    assert cell.what in err[0] or first is not cell  # a cell earlier in the table may speak first
    assert not out.exists()


def _cli_run(flags) -> dict:
    algo = next((a for a, f in FLAGS.items() if f == flags), None)
    kv = next((k for k, f in KV_FLAGS.items() if f == flags), None)
    return {"quant_algo": algo, "kv_cache_quant_algo": kv, "family": "llama"}


@pytest.mark.parametrize("argv,expected", [
    (["--gpu", "b200", "--smoothquant"], "build_engine: error: SmoothQuant (INT8) engines are refused "
     "on Blackwell (SM 100) and newer on b200 (SM 100): use --fp8 on Blackwell"),
    (["--gpu", "a100", "--fp8"], "build_engine: error: FP8 GEMMs need Ada / Hopper (SM 89) or newer "
     "on a100 (SM 80): use --awq or --smoothquant on this GPU"),
    (["--gpu", "a100", "--awq", "--awq-act", "fp8"], "build_engine: error: W4A8 AWQ (FP8 "
     "activations) runs on Ada / Hopper (SM 89 / 90) only on a100 (SM 80): drop --awq-act fp8"),
    (["--gpu", "k80"], "build_engine: error: --gpu 'k80': unknown GPU; give sm_XX (e.g. sm_90) or one of"),
])
def test_cli_gpu_refusals(tmp_path, tiny_model, capsys, argv, expected):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not out.exists()


def test_cli_warns_on_an_untested_gpu_and_build_json_records_it(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
                 "--gpu", "v100"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["build_engine: warning: TensorRT-LLM 1.x is not tested before Ampere (SM 80) on "
                   "v100 (SM 70): use an Ampere or newer GPU (tensorrt_llm/_torch/modules/fused_moe/"
                   "fused_moe_cutlass.py CutlassFusedMoE._QUANT_SUPPORT_TABLE (unquantized: SM >= 80))"]
    options = json.loads((out / "build.json").read_text())["options"]
    assert options["gpu"] == "v100"
    assert options["target_gpu"] == {"name": "v100", "sm": 70, "from": "--gpu"}


def test_without_a_gpu_the_table_is_not_applied_and_a_note_says_so(tmp_path, tiny_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: it is the default --gpu")
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--no-progress",
                 "--int8-weight-only"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == ""  # a plan line, not a warning: stderr stays for errors
    assert ("gpu: no --gpu and no GPU on this host: the GPU rows of the capability table "
            "(check/gpu.py) were not applied; give --gpu NAME|sm_XX") in captured.out.splitlines()
    assert "target_gpu" not in json.loads((out / "build.json").read_text())["options"]


def test_readme_gpu_matrix_is_generated_from_the_table():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert support_matrix.readme_block(text) == support_matrix.render(), \
        "README's capability table is stale: run python tools/support_matrix.py --write"
    assert parse_gpu("H100") == ("H100", 90) and parse_gpu("sm_120") == ("sm_120", 120)


def test_from_checkpoint_is_checked_with_the_checkpoint_s_format(tmp_path, tiny_model, capsys):
    """--from-checkpoint: the table is asked about the checkpoint's own format and family (here a
    float one on a Volta: the pre-Ampere warning, before the engine stage)."""
    from convert_helper import convert_checkpoint

    hf_dir, _ = tiny_model()
    convert_checkpoint(hf_dir, tmp_path / "ckpt", tp=1, dtype="float16", progress=False)
    capsys.readouterr()
    main(["--from-checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"),
          "--gpu", "sm_70", "--triton-target", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("build_engine: warning: TensorRT-LLM 1.x is not tested before Ampere "
                             "(SM 80) on sm_70 (SM 70): use an Ampere or newer GPU"), err


def test_host_gpu_is_read_from_the_driver_without_torch(tmp_path):
    """The default --gpu: the driver's /proc entry (no torch import on the float path), its
    marketing name matched to the table by the longest known name it contains."""
    from check.gpu import sm_of_name
    from pipeline.preflight import _host_gpu

    assert _host_gpu(tmp_path / "none") == (None, None)
    gpu = tmp_path / "gpus" / "0000:17:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t 17\n")
    assert _host_gpu(tmp_path / "gpus") == ("NVIDIA H100 80GB HBM3", 90)
    assert sm_of_name("NVIDIA A100-SXM4-80GB") == 80 and sm_of_name("NVIDIA A10G") == 86
    assert sm_of_name("NVIDIA L40S") == 89 and sm_of_name("Tesla K80") is None
