"""The real thing, on a GPU host with TensorRT-LLM 1.0 … 1.2.x: SmolLM2-135M → build_engine
(checkpoint, then engines through the real backend) → one greedy generation with TensorRT-LLM's
runtime, checked against the Hugging Face model.

Skipped (at module level, with the reason) wherever ``tensorrt_llm`` does not import or no CUDA
GPU is visible — that is, everywhere but a GPU host with TensorRT-LLM installed.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders.engine import REQUIREMENT, version_in_range

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
MAX_NEW_TOKENS = 16

pytestmark = [pytest.mark.trtllm, pytest.mark.slow]


def _skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return f"tensorrt_llm is not installed (engines need {REQUIREMENT} on a GPU host)"
    try:
        import tensorrt_llm
    except Exception as e:  # noqa: BLE001 - any import failure means: cannot run here
        return f"import tensorrt_llm failed: {type(e).__name__}: {e}"
    if not version_in_range(tensorrt_llm.__version__):
        return (f"tensorrt_llm {tensorrt_llm.__version__} has no TensorRT engine backend "
                f"(engines need {REQUIREMENT})")
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


_REASON = _skip_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

import torch  # noqa: E402


def _build_engine_command() -> list[str]:
    exe = shutil.which("build_engine")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from builders.cli import main; sys.exit(main())"]


def _runner(engine_dir: Path):
    """TensorRT-LLM's C++ runtime where its bindings exist (the default of examples/run.py in
    1.x), else the Python ModelRunner."""
    from tensorrt_llm.runtime import PYTHON_BINDINGS, ModelRunner

    if PYTHON_BINDINGS:
        from tensorrt_llm.runtime import ModelRunnerCpp

        return ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=0, max_batch_size=1,
                                       max_output_len=MAX_NEW_TOKENS,
                                       kv_cache_free_gpu_memory_fraction=0.3)
    return ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)


def test_smollm2_engine_builds_and_generates(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    cmd = _build_engine_command() + ["--model", str(smollm2_dir), "--output", str(out),
                                     "--tp", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert p.returncode == 0, (f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n"
                               f"{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")

    engines = out / "engines"
    assert (engines / "rank0.engine").is_file() and (engines / "rank0.engine").stat().st_size > 0
    config = json.loads((engines / "config.json").read_text())
    assert config["pretrained_config"]["mapping"]["world_size"] == 1
    assert config["pretrained_config"]["architecture"] == "LlamaForCausalLM"
    assert (engines / "logs" / "rank0.log").is_file()
    assert not (out / "engines.partial").exists()
    # the Triton repository, filled from the real engine config.json
    from builders.triton import validate_repo

    models = validate_repo(out / "triton")
    assert models["tensorrt_llm"].max_batch_size == min(64, config["build_config"]["max_batch_size"])

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids, "the tokenizer produced no ids"
    end_id = tok.eos_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id

    # the HF model's greedy next token, on CPU in float32
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_first = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
    vocab = hf.config.vocab_size
    del hf

    runner = _runner(engines)
    outputs = runner.generate(batch_input_ids=[torch.tensor(ids, dtype=torch.int32)],
                              max_new_tokens=MAX_NEW_TOKENS, end_id=end_id, pad_id=pad_id,
                              top_k=1, num_beams=1, return_dict=True,
                              output_sequence_lengths=True)
    torch.cuda.synchronize()
    output_ids = outputs["output_ids"]            # [batch, beams, max_seq_len], prompt included
    seq_len = int(outputs["sequence_lengths"][0][0])
    assert output_ids[0][0][:len(ids)].tolist() == ids
    new = output_ids[0][0][len(ids):seq_len].tolist()

    assert 0 < len(new) <= MAX_NEW_TOKENS
    assert all(0 <= t < vocab for t in new)
    assert new[0] == hf_first, (f"engine's first token {new[0]} ({tok.decode([new[0]])!r}) != "
                                f"HF greedy {hf_first} ({tok.decode([hf_first])!r})")
    text = tok.decode(new, skip_special_tokens=True)
    assert any(c.isalnum() for c in text), f"no text generated: {text!r}"
