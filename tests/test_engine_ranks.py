"""``--ranks``: one node's ranks of a multi-node build (builders/engine.py), with the in-process
TEST DOUBLE ``RecordingFakeTrtllm`` (engine_fakes.py): subsets that together equal one full run,
GPU records, and mixing of GPU types or options refused.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from builders.engine import FAILED, build_engines
from common.errors import UserError
from engine_fakes import RecordingFakeTrtllm, engine_files, make_checkpoint


# --- --ranks: one node's ranks, GPU records, mixing refused -------------------------------------

def _tree(root: Path, skip=(".ranks",)) -> dict:
    """Every file under root (relative path → bytes), except the per-host GPU records."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)}


def test_two_runs_with_disjoint_ranks_equal_one_full_run(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2, pp=2)
    full = tmp_path / "full" / "engines"
    assert build_engines(ckpt, full, backend=RecordingFakeTrtllm()).ok
    split = tmp_path / "split" / "engines"
    first = RecordingFakeTrtllm()
    res = build_engines(ckpt, split, backend=first, ranks="0-1")
    assert res.ok and not res.complete and res.engines_dir is None
    assert sorted(c["rank"] for c in first.calls) == [0, 1]
    assert not split.exists()  # engines/ appears only complete
    assert "missing: 2-3" in res.message and "engines.partial" in res.message
    assert res.command_hint.endswith("--ranks 0-1")
    second = RecordingFakeTrtllm()
    res = build_engines(ckpt, split, backend=second, ranks="2-3")
    assert res.ok and res.complete and res.engines_dir == split
    assert sorted(c["rank"] for c in second.calls) == [2, 3]
    assert not split.with_name("engines.partial").exists()
    assert _tree(split) == _tree(full)  # engines, config.json and logs, byte for byte
    assert sorted(res.built_on) == [0, 1, 2, 3]
    assert all(rec["gpu"]["name"] == "NVIDIA H100 80GB HBM3" for rec in res.built_on.values())


def test_ranks_from_another_gpu_type_are_not_mixed_in(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0-1").ok
    stage = engines.with_name("engines.partial")
    before = _tree(stage, skip=())
    other = RecordingFakeTrtllm(gpu_name="NVIDIA A100-SXM4-80GB", cc="8.0")
    with pytest.raises(UserError) as e:
        build_engines(ckpt, engines, backend=other, ranks="2-3")
    msg = str(e.value)
    assert "\n" not in msg
    assert "rank0.engine was built on NVIDIA H100 80GB HBM3 (compute capability 9.0)" in msg
    assert "this host's GPU is NVIDIA A100-SXM4-80GB (compute capability 8.0)" in msg
    assert "NVIDIA/TensorRT-LLM#222" in msg and "--force" in msg
    assert other.calls == [] and _tree(stage, skip=()) == before and not engines.exists()
    # the same GPU type joins; --force rebuilding every rank here replaces the other GPU's ranks
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="2-3").complete
    res = build_engines(ckpt, engines, backend=other, force=True)
    assert res.complete and {r["gpu"]["compute_capability"] for r in res.built_on.values()} \
        == {"8.0"}


def test_a_host_mixing_gpu_types_in_one_run_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    fake = RecordingFakeTrtllm(gpus=2, gpu_by_device={"1": {"name": "NVIDIA L40S",
                                                            "compute_capability": "8.9"}})
    with pytest.raises(UserError, match="GPU 0 is NVIDIA H100 80GB HBM3 .* but GPU 1 is "
                                        "NVIDIA L40S"):
        build_engines(ckpt, tmp_path / "out" / "engines", {"build_workers": 2}, backend=fake)
    assert fake.calls == []


def test_ranks_with_other_options_are_not_mixed_in(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=2)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0").ok
    fake = RecordingFakeTrtllm()
    with pytest.raises(UserError, match="holds ranks built from another checkpoint or with "
                                        "other engine options"):
        build_engines(ckpt, engines, {"max_batch_size": 8}, backend=fake, ranks="1")
    assert fake.calls == []


def test_a_failing_subset_run_keeps_the_other_runs_ranks(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    engines = tmp_path / "out" / "engines"
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="0-1").ok
    res = build_engines(ckpt, engines, backend=RecordingFakeTrtllm(fail_ranks={3}), ranks="2-3")
    assert res.status == FAILED
    stage = engines.with_name("engines.partial")
    assert engine_files(stage) == ["rank0.engine", "rank1.engine"]  # none of the failed run's
    assert build_engines(ckpt, engines, backend=RecordingFakeTrtllm(), ranks="2-3").complete


@pytest.mark.parametrize("ranks, match", [
    ("2-5", r"--ranks 2-5 is not a range inside the world of 4 rank\(s\) \(0-3\)"),
    ("3-1", "is not a range inside"),
    ("a-b", "--ranks must be A-B or R with whole numbers"),
])
def test_bad_rank_ranges_are_user_errors(tmp_path, ranks, match):
    ckpt = make_checkpoint(tmp_path, tp=4)
    fake = RecordingFakeTrtllm()
    with pytest.raises(UserError, match=match):
        build_engines(ckpt, tmp_path / "out" / "engines", backend=fake, ranks=ranks)
    assert fake.calls == []


def test_a_rank_subset_needs_only_its_own_checkpoint_files(tmp_path):
    ckpt = make_checkpoint(tmp_path, tp=4)
    (ckpt / "rank0.safetensors").unlink()  # e.g. a node that converted ranks 2-3 only
    assert build_engines(ckpt, tmp_path / "out" / "engines", backend=RecordingFakeTrtllm(),
                         ranks="2-3").ok
    with pytest.raises(UserError, match="rank0.safetensors missing"):
        build_engines(ckpt, tmp_path / "out" / "engines", backend=RecordingFakeTrtllm(),
                      ranks="0-1")
