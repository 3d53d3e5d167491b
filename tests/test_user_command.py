"""The command this project exists for, exactly as a user types it after `bash setup.sh`:

    build_engine --model llama --tp 2 --smoothquant --output out --verify

`llama` is the real SmolLM2-135M (9 heads, 3 KV heads) with --pad-heads implied, so tp 2 pads it
exactly to 12 / 4 heads. It calibrates SmoothQuant with the defaults (32 x 512 tokens: about 3.5
minutes on 2 CPU cores), writes the tp-2 checkpoint and the Triton repository, passes --verify, and
without TensorRT-LLM ends with exit 3 and the one-line command for the GPU host.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND = "--model llama --tp 2 --smoothquant --output out --verify"


def _run(args, cwd, timeout=1800):
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's code, from another directory
    return subprocess.run([sys.executable, "-m", "builders", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_users_command_as_typed(tmp_path, smollm2_dir):
    p = _run(COMMAND.split(), cwd=tmp_path)
    trtllm = importlib.util.find_spec("tensorrt_llm") is not None
    assert p.returncode == (0 if trtllm else 3), p.stderr[-3000:]
    out = tmp_path / "out"
    assert ("heads: padded 9 -> 12 heads, 3 -> 4 KV heads (exact; +33 % attention compute and KV "
            "cache) so that tp 2 splits them") in p.stdout
    assert "verify: PASS" in p.stdout, p.stdout
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    # --smoothquant: TensorRT-LLM's per-channel / per-token plugin recipe (the default)
    assert cfg["mapping"]["tp_size"] == 2
    assert cfg["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert "quality gate (" in p.stdout + p.stderr
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == (12, 4, 64)
    assert sorted(f.name for f in (out / "checkpoint").iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors"]
    assert (out / "triton" / "tensorrt_llm" / "config.pbtxt").is_file()
    manifest = json.loads((out / "build.json").read_text())
    assert manifest["layout"]["head_padding"]["num_attention_heads"] == [9, 12]
    if not trtllm:  # the one line that says how to finish on a GPU host
        line = next(ln for ln in p.stderr.splitlines() if ln.startswith("engines:"))
        assert "build_engine --from-checkpoint out/checkpoint --output out --triton-target none" in line, line


def test_llama_example_at_tp_4_is_exact_on_real_weights(tmp_path, smollm2_dir):
    """Float, tp 4 (12 heads: 3 per rank, one KV head each): the reference reader's logits equal
    the unpadded HF model's."""
    p = _run(["--model", "llama", "--tp", "4", "--dtype", "float32", "--output", "o", "--verify",
              "--checkpoint-only", "--no-progress"], cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("verify:"))
    assert line.startswith("verify: PASS") and "tp 4" in line
    rel = float(line.split("rel err ")[1].split()[0])
    assert rel < 1e-5, line


@pytest.mark.parametrize("tp", [1, 3])
def test_llama_example_is_not_padded_where_tp_divides_the_heads(tmp_path, smollm2_dir, tp):
    p = _run(["--model", "llama", "--tp", str(tp), "--output", "o", "--checkpoint-only",
              "--no-progress"], cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "padded" not in p.stdout and "--pad-heads" not in p.stderr
    cfg = json.loads((tmp_path / "o" / "checkpoint" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
