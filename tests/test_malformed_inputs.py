"""Issue 29, class 10: every JSON file build_engine reads, malformed in each way we could think of,
ends in one line naming the file, what is wrong and the fix; exit 2; no traceback; nothing
written (the refusal comes before any work).

The cases run the CLI's ``main()`` in this process (an escaping exception fails the test with
its traceback); ``test_malformed_config_in_a_subprocess`` runs one through ``python -m builders``
to show what a user sees at the process boundary."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders.cli import main
from convert_helper import refused

CAL = ["--calib-size", "2", "--calib-seq-len", "16"]


@pytest.fixture(scope="module")
def model_dir(golden_llama):
    return golden_llama  # tests/conftest.py


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory):
    """A float checkpoint and an FP8 calibration store made from ``model_dir``."""
    root = tmp_path_factory.mktemp("built")
    assert main(["--model", str(model_dir), "--output", str(root / "float"), "--checkpoint-only",
                 "--no-progress"]) == 0
    assert main(["--model", str(model_dir), "--output", str(root / "fp8"), "--checkpoint-only",
                 "--no-progress", "--fp8", *CAL]) == 0
    return root


def _copy(src: Path, dst: Path, files: dict) -> Path:
    shutil.copytree(src, dst)
    for name, data in files.items():
        (dst / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return dst


def _config(model_dir, **changes) -> str:
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(changes)
    return json.dumps(raw)


# (files replaced in the model dir, flags, what the line must say); the tokenizer's files are read
# by calibration (--fp8) and by the Triton repository's writer (no --checkpoint-only)
CK = ["--checkpoint-only"]
MODEL_CASES = {
    "config-not-json": ({"config.json": "{not json"}, CK, r"config.json is not valid JSON .*"
                        r"re-download the model"),
    "config-not-utf8": ({"config.json": b"\xff\xfe\x00{}"}, CK, r"config.json is not valid JSON"),
    "config-a-list": ({"config.json": "[1, 2]"}, CK,
                      r"config.json holds a JSON list, not an object .*re-download"),
    "config-a-string": ({"config.json": '"llama"'}, CK, r"config.json holds a JSON str"),
    "heads-abc": ({"config.json": dict(num_attention_heads="abc")}, CK,
                  r"config.json with transformers: .*num_attention_heads.*fix config.json"),
    "heads-negative": ({"config.json": dict(num_attention_heads=-1)}, CK,
                       r"config.json: num_attention_heads is -1; it must be a positive integer"),
    "heads-a-list": ({"config.json": dict(num_attention_heads=[8])}, CK,
                     r"config.json with transformers: .*num_attention_heads"),
    "layers-zero": ({"config.json": dict(num_hidden_layers=0)}, CK,
                    r"num_hidden_layers is 0; it must be a positive integer"),
    "vocab-negative": ({"config.json": dict(vocab_size=-3)}, CK, r"vocab_size is -3"),
    "architectures-a-string": ({"config.json": dict(architectures="LlamaForCausalLM")}, CK,
                               r'architectures is "LlamaForCausalLM", not a list'),
    "index-not-json": ({"model.safetensors.index.json": "{x"}, CK,
                       r"index.json is not a valid safetensors index .*re-download"),
    "index-a-list": ({"model.safetensors.index.json": "[]"}, CK,
                     r"index.json is not a valid safetensors index"),
    "index-no-weight-map": ({"model.safetensors.index.json": "{}"}, CK,
                            r"index.json is not a valid safetensors index"),
    "index-weight-map-a-list": ({"model.safetensors.index.json": '{"weight_map": []}'}, CK,
                                r"its weight_map must map each tensor name to a shard file"),
    "index-file-an-int": ({"model.safetensors.index.json": '{"weight_map": {"a": 3}}'}, CK,
                          r"its weight_map must map"),
    "tokenizer-not-json": ({"tokenizer.json": "{x"}, ["--fp8", "--checkpoint-only", *CAL],
                           r"calibration needs the model's tokenizer but .* has none that loads"),
    "tokenizer-config-a-list": ({"tokenizer_config.json": "[]"}, [],
                                r"cannot load a tokenizer from it .*--triton-target none"),
    "generation-config-not-json": ({"generation_config.json": "{x"}, [],
                                   r"generation_config.json: unreadable .*fix or remove it"),
    "generation-config-a-list": ({"generation_config.json": "[]"}, [],
                                 r"generation_config.json: holds a JSON list, not an object"),
    "generation-config-eos-abc": ({"generation_config.json": '{"eos_token_id": "abc"}'}, [],
                                  r'eos_token_id is "abc", not a token id'),
    "generation-config-pad-negative": ({"generation_config.json": '{"pad_token_id": [-1]}'}, [],
                                       r"pad_token_id is \[-1\], not a token id"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_malformed_model_files(case, model_dir, tmp_path, capsys):
    files, flags, pattern = MODEL_CASES[case]
    files = {k: _config(model_dir, **v) if isinstance(v, dict) else v for k, v in files.items()}
    d = _copy(model_dir, tmp_path / "model", files)
    refused(capsys, ["--model", str(d), *flags], tmp_path / "out", re.escape(str(d)), pattern)


CHECKPOINT_CASES = {
    "not-json": ("{x", r"is not a TensorRT-LLM checkpoint config .*give the checkpoint/"),
    "a-list": ("[]", r"is not a TensorRT-LLM checkpoint config"),
    "tp-abc": (None, r"is not a TensorRT-LLM checkpoint config \(invalid literal"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_malformed_checkpoint_config(case, built, tmp_path, capsys):
    text, pattern = CHECKPOINT_CASES[case]
    if text is None:
        cfg = json.loads((built / "float" / "checkpoint" / "config.json").read_text())
        cfg["mapping"]["tp_size"] = "abc"
        text = json.dumps(cfg)
    ck = _copy(built / "float" / "checkpoint", tmp_path / "checkpoint", {"config.json": text})
    refused(capsys, ["--from-checkpoint", str(ck), "--triton-target", "none"], tmp_path / "out",
            re.escape(str(ck / "config.json")), pattern)


@pytest.mark.parametrize("text", ["{x", "[]", '"calibration"', "LAYERS"],
                         ids=["not-json", "a-list", "a-string", "layers-done-abc"])
def test_malformed_calibration_manifest(text, built, model_dir, tmp_path, capsys):
    store = built / "fp8" / "calibration"
    if text == "LAYERS":
        man = json.loads((store / "calibration.json").read_text())
        text = json.dumps({**man, "layers_done": "abc"})
    st = _copy(store, tmp_path / "calibration", {"calibration.json": text})
    refused(capsys, ["--model", str(model_dir), "--fp8", *CAL, "--checkpoint-only",
                     "--calibration", str(st)], tmp_path / "out",
             re.escape(str(st / "calibration.json")),
             r"is not a calibration manifest as build_engine writes it .*drop --calibration")


def test_malformed_config_in_a_subprocess(model_dir, tmp_path):
    """What the user sees: one line on stderr, exit 2, no traceback, nothing written."""
    d = _copy(model_dir, tmp_path / "model", {"config.json": '{"num_attention_heads": [8]}'})
    (d / "config.json").write_text(_config(model_dir, num_attention_heads=[8]))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "builders", "--model", str(d), "--output", str(out),
                        "--checkpoint-only", "--no-progress"], capture_output=True, text=True,
                       timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "Traceback" not in p.stderr and str(d / "config.json") in err[0]
    assert not out.exists()


# --- the calibration text (issue 29's weak spots) ------------------------------------------------

CALIB_CASES = {
    "three-tokens": ("the cat sat".encode(), [],
                     r"holds \d tokens but calibration needs at least one whole sample of "
                     r"--calib-seq-len 512 tokens \(511 of text; 16352 to use no token twice over "
                     r"--calib-size 32\); give a longer text or lower --calib-seq-len"),
    "three-tokens-pytorch": ("the cat sat".encode(), ["--target", "pytorch"],
                             r"holds \d tokens but calibration needs at least one whole sample"),
    "binary": (bytes(range(256)) * 64, [], r"is not UTF-8 text \(byte 0x80 at offset 128\); "
               r"give a plain-text file"),
    "control-characters": (bytes(range(32)) * 64, [],
                           r"is not text: \d+ % of its characters are control characters"),
}


@pytest.mark.parametrize("case", sorted(CALIB_CASES))
def test_unusable_calibration_text(case, model_dir, tmp_path, capsys):
    data, flags, pattern = CALIB_CASES[case]
    text = tmp_path / "calib.txt"
    text.write_bytes(data)
    refused(capsys, ["--model", str(model_dir), "--fp8", "--checkpoint-only", "--calib-data",
                     str(text), *flags], tmp_path / "out", re.escape(str(text)), pattern)


def test_calibration_text_of_one_sample_is_enough(model_dir, tmp_path, capsys):
    """The floor is one whole --calib-seq-len sample: a text just that long calibrates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = (Path(__file__).resolve().parent / "data" / "austen.txt").read_text().split()
    n = next(i for i in range(1, len(words)) if
             len(tok.encode(" ".join(words[:i]), add_special_tokens=False)) >= 15)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words[:n]))
    assert main(["--model", str(model_dir), "--fp8", "--checkpoint-only", "--calib-data",
                 str(text), *CAL, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    text.write_text(" ".join(words[:n - 1]))
    short = len(tok.encode(text.read_text(), add_special_tokens=False))
    assert short < 15
    refused(capsys, ["--model", str(model_dir), "--fp8", "--checkpoint-only", "--calib-data",
                     str(text), *CAL], tmp_path / "out2", rf"holds {short} tokens")
