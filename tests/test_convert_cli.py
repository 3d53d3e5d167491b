"""The build_engine CLI contract for the checkpoint stage: outputs, exit codes, one-line errors,
no half-written output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from builders.cli import main


def run_cli(*args):
    """Run build_engine in a subprocess, as a user would."""
    p = subprocess.run([sys.executable, "-m", "builders", *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("build_engine: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_checkpoint_layout_and_index_json_input(tmp_path, tiny_model):
    hf_dir, _ = tiny_model(max_shard_size="100KB", num_hidden_layers=3)
    assert (hf_dir / "model.safetensors.index.json").is_file()
    rc, out, err = run_cli("--model", hf_dir, "--output", tmp_path / "out", "--tp", "2", "--pp", "2",
                           "--checkpoint-only", "--no-progress", "--workers", "2")
    assert rc == 0, err
    ckpt = tmp_path / "out" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors",
        "rank3.safetensors"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    # pp stage 0 holds HF layers 0,1 (+ embedding), stage 1 holds HF layer 2 renumbered 0 (+ head)
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.vocab_embedding.weight" in keys and "lm_head.weight" not in keys
    assert "transformer.layers.1.mlp.fc.weight" in keys
    with safe_open(str(ckpt / "rank3.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight", "transformer.ln_f.weight", "transformer.layers.0.mlp.fc.weight"} <= keys
    assert "transformer.layers.1.mlp.fc.weight" not in keys
    assert "transformer.vocab_embedding.weight" not in keys
    assert not list((tmp_path / "out").glob("*.partial"))


def test_smollm2_tp2_fails_at_once_with_one_line(tmp_path, smollm2_dir):
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", smollm2_dir, "--output", out, "--tp", "2")
    assert rc == 2
    line = _one_error_line(err)
    assert "9 attention heads" in line and "tp 2" in line and "valid --tp values: 1, 3" in line
    assert not out.exists() or not any(out.iterdir())


def test_output_exists_needs_force(tmp_path, tiny_model, capsys):
    hf_dir, _ = tiny_model()
    out = tmp_path / "out"
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                 "--no-progress"]) == 0
    before = (out / "checkpoint" / "rank0.safetensors").stat().st_mtime_ns
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (out / "checkpoint" / "rank0.safetensors").stat().st_mtime_ns == before
    assert main(["--model", str(hf_dir), "--output", str(out), "--checkpoint-only", "--force",
                 "--no-progress", "--tp", "2"]) == 0
    assert json.loads((out / "checkpoint" / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert not (out / "checkpoint" / "rank2.safetensors").exists()


@pytest.mark.parametrize("setup,message", [
    ("missing_dir", "does not exist"),
    ("no_config", "has no config.json"),
    ("bin_only", "pickle"),
    ("missing_tensor", "model.layers.1.mlp.up_proj.weight is missing"),
    ("wrong_shape", "has shape"),
    ("truncated", "truncated or corrupt"),
    ("index_missing_shard", "names shard"),
])
def test_bad_inputs_one_line_exit2_no_output(tmp_path, tiny_model, setup, message):
    import torch
    from safetensors.torch import load_file, save_file

    if setup == "index_missing_shard":
        hf_dir, _ = tiny_model(max_shard_size="100KB")
        sorted(hf_dir.glob("model-*.safetensors"))[1].unlink()
    else:
        hf_dir, _ = tiny_model()
    st = hf_dir / "model.safetensors"
    if setup == "missing_dir":
        hf_dir = tmp_path / "nowhere"
    elif setup == "no_config":
        (hf_dir / "config.json").unlink()
    elif setup == "bin_only":
        torch.save(load_file(st), hf_dir / "pytorch_model.bin")
        st.unlink()
    elif setup in ("missing_tensor", "wrong_shape"):
        sd = load_file(st)
        if setup == "missing_tensor":
            del sd["model.layers.1.mlp.up_proj.weight"]
        else:
            sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
        save_file(sd, st)
    elif setup == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", "--no-progress")
    assert rc == 2, err
    assert message in _one_error_line(err)
    assert not (out / "checkpoint").exists()
    assert not out.exists() or not any(out.iterdir())
