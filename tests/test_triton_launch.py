"""launch_triton.sh (mpirun and Slurm forms, refusing to start without engines) and the engine
values the repository is filled from before the engines exist (trtllm-build's max_seq_len
deduction and max_input_len clipping), plus which --triton-target a repository records.

``mpirun``, ``srun`` and ``tritonserver`` are replaced by *recording test doubles*: tiny scripts on
PATH that write their argument vectors to a file, so the tests check the exact command lines the
launch script would run without any MPI, Slurm or Triton installed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from builders import triton as tr
from common.errors import UserError
from triton_fakes import checkpoint_config, engine_repo, params


def _recorder(bin_dir: Path, name: str, log: Path) -> Path:
    """A recording test double: ``name`` on PATH appends its argv (one JSON list) to ``log``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                   f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    exe.chmod(0o755)
    return exe


def _run(script: Path, *args, env_extra=None, path_dir: Path | None = None):
    env = dict(os.environ)
    if path_dir is not None:
        env["PATH"] = f"{path_dir}:{env['PATH']}"
    env.update(env_extra or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def _fake_engines(engines: Path, world: int) -> None:
    engines.mkdir(parents=True, exist_ok=True)
    (engines / "config.json").write_text("{}")
    for r in range(world):
        (engines / f"rank{r}.engine").write_bytes(b"")


def test_launch_refuses_without_engines_then_runs_mpirun(tmp_path, tokenizer_dir):
    repo = engine_repo(tmp_path, tokenizer_dir, tp=2)
    script = repo / "launch_triton.sh"
    engines = tmp_path / "out" / "engines"
    res = _run(script)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert f"{engines.resolve()}/config.json is missing" in lines[0]
    assert "build the engines first" in lines[0]

    _fake_engines(engines, 2)
    log = tmp_path / "argv.log"
    bin_dir = tmp_path / "bin"
    _recorder(bin_dir, "mpirun", log)
    res = _run(script, path_dir=bin_dir)
    assert res.returncode == 0, res.stderr
    (argv,) = [json.loads(x) for x in log.read_text().splitlines()]
    info = json.loads((repo / "triton_repo.json").read_text())
    expected = info["launch"][1:]  # without "mpirun"
    assert argv == expected


def test_launch_slurm_form_one_task_per_rank(tmp_path, tokenizer_dir):
    repo = engine_repo(tmp_path, tokenizer_dir, tp=2)
    script = repo / "launch_triton.sh"
    engines = tmp_path / "out" / "engines"
    _fake_engines(engines, 2)
    log = tmp_path / "argv.log"
    bin_dir = tmp_path / "bin"
    _recorder(bin_dir, "srun", log)
    server = _recorder(bin_dir, "tritonserver", log)
    res = _run(script, "slurm", path_dir=bin_dir)
    assert res.returncode == 0, res.stderr
    info = json.loads((repo / "triton_repo.json").read_text())
    srun_argv = json.loads(log.read_text().splitlines()[0])
    assert ["srun"] + srun_argv == info["launch_slurm"]
    assert srun_argv[:3] == ["--mpi=pmix", "--ntasks=2", "--kill-on-bad-exit=1"]

    # what each srun task runs: its rank's tritonserver, as mpirun would start that rank
    launch = info["launch"]
    per_rank = []
    for rank in range(2):
        res = _run(script, "slurm-task", path_dir=bin_dir,
                   env_extra={"SLURM_PROCID": str(rank), "TRITONSERVER": str(server)})
        assert res.returncode == 0, res.stderr
        per_rank.append(json.loads(log.read_text().splitlines()[-1]))
    starts = [i for i, a in enumerate(launch) if a == tr.TRITONSERVER]
    for rank, start in enumerate(starts):
        end = launch.index(":", start) if ":" in launch[start:] else len(launch)
        assert per_rank[rank] == launch[start + 1:end]
    assert "--load-model=tensorrt_llm" in per_rank[1] and \
        "--load-model=tensorrt_llm" not in per_rank[0]

    (engines / "rank1.engine").unlink()  # this node lacks rank 1's engine: that task refuses
    res = _run(script, "slurm-task", path_dir=bin_dir, env_extra={"SLURM_PROCID": "1"})
    assert res.returncode == 2 and "rank1.engine is missing" in res.stderr
    res = _run(script, "slurm-task", path_dir=bin_dir, env_extra={"SLURM_PROCID": "2"})
    assert res.returncode == 2 and "beyond world size 2" in res.stderr
    res = _run(script, "pbs", path_dir=bin_dir)
    assert res.returncode == 2 and "unknown launcher 'pbs'" in res.stderr


def _deduced(max_pos, scaling):
    """trtllm-build's rule (tensorrt_llm/builder.py _init_max_seq_len), written out again."""
    n = max_pos or 2048
    kind = (scaling or {}).get("type", (scaling or {}).get("rope_type"))
    factor = 1 if kind in ("su", "longrope", "llama3") else (scaling or {}).get("factor",
                                                                                      1.0)
    return math.ceil(n * factor) if factor != 1 else n


@pytest.mark.parametrize("max_pos,scaling,max_input_len", [
    (1000, {"type": "linear", "factor": 1.0005}, 4096),   # ceil: 1001, not int() = 1000
    (1000, {"type": "dynamic", "factor": 2.0}, 1024),
    (8192, {"rope_type": "llama3", "factor": 8.0}, 1024),  # llama3: no length scaling
    (4096, {"rope_type": "yarn", "factor": 2.5}, 16384),  # yarn stretches the length
    (512, None, 1024),                                    # default max_input_len clipped
    (None, None, 4096),                                   # no max_position_embeddings: 2048
])
def test_engine_limits_before_engines_exist(tmp_path, tokenizer_dir, max_pos, scaling,
                                            max_input_len):
    cfg = checkpoint_config(max_position_embeddings=max_pos)
    if scaling:
        cfg["rotary_scaling"] = scaling
    ec = tr.engine_config_from_checkpoint(cfg, {"max_input_len": max_input_len})
    seq = _deduced(max_pos, scaling)
    assert ec["build_config"]["max_seq_len"] == seq
    assert ec["build_config"]["max_input_len"] == min(max_input_len, seq)
    repo = tr.write_engine_repo(tmp_path / "t", engine_dir=tmp_path / "e",
                                tokenizer_dir=tokenizer_dir, engine_config=ec)
    # the preprocessing model refuses prompts longer than this, as the engine would
    pre = tr.validate_repo(repo)["preprocessing"]
    assert params(pre)["max_input_len"] == str(min(max_input_len, seq))


def test_repositories_record_their_target(tmp_path, tokenizer_dir):
    repo = engine_repo(tmp_path, tokenizer_dir)
    assert json.loads((repo / "triton_repo.json").read_text())["options"]["triton_target"] == \
        "engine"
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in Path(tokenizer_dir).iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    (hf / "config.json").write_text(json.dumps({"model_type": "llama",
                                                "architectures": ["LlamaForCausalLM"]}))
    llm = tr.write_llmapi_repo(tmp_path / "l", model_dir=hf, options={})
    assert json.loads((llm / "triton_repo.json").read_text())["options"]["triton_target"] == \
        "pytorch"
    with pytest.raises(UserError, match="--triton-target engine does not apply to --target "
                                        "pytorch"):
        tr.write_llmapi_repo(tmp_path / "l2", model_dir=hf, options={"triton_target": "engine"})
    assert not (tmp_path / "l2").exists()
    script = llm / "launch_triton.sh"
    (hf / "config.json").unlink()  # the model moved away: one line, exit 2
    res = _run(script)
    assert res.returncode == 2 and f"{hf.resolve()}/config.json is missing" in res.stderr


def test_llmapi_model_py_leaves_the_mpi_environment(tmp_path, tokenizer_dir, pb_utils,
                                                    monkeypatch):
    """Started under `mpirun -n 1` (launch_triton.sh, as upstream's launch_triton_server.py), the
    LLM-API model.py leaves OMPI_*/PMIX_* alone, as upstream's model.py does; the LLM (the
    fake_tensorrt_llm test double) is created with the environment tritonserver got."""
    import sys

    from triton_fakes import fake_tensorrt_llm, hf_dir, init_model

    job = {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"}
    for k, v in job.items():
        monkeypatch.setenv(k, v)
    seen = {}
    trtllm = fake_tensorrt_llm()
    real_init = trtllm.LLM.__init__

    def init(self, **kw):
        seen.update({k: os.environ.get(k) for k in job})
        real_init(self, **kw)

    trtllm.LLM.__init__ = init
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trtllm)
    repo = tr.write_llmapi_repo(tmp_path / "triton", model_dir=hf_dir(tmp_path, tokenizer_dir))
    model = init_model(repo, "tensorrt_llm")
    try:
        assert seen == job and all(os.environ.get(k) == v for k, v in job.items())
    finally:
        model.finalize()
