"""The layer-by-layer reader of unified (``--target pytorch``) checkpoints (verify/unified_lazy.py):
``open_checkpoint(lazy=True)`` gives, module for module, the tensors that ``load_unified`` (the
whole reader) gives, for every unified format this project writes, and a read touches only the
bytes of the layer it is for. Tiny random models, 4 calibration samples x 64 tokens."""
from __future__ import annotations

import pytest
import torch

from quant_common import TINY, byte_tokenizer

# case -> (family, quant_algo, kv cache, model overrides)
CASES = {
    "float": ("llama", None, None, {}),
    "fp8": ("llama", "FP8", None, {}),
    "fp8_kv": ("llama", "FP8", "fp8", {}),
    "kv_only": ("llama", None, "fp8", {}),
    "sq": ("llama", "W8A8_SQ_PER_CHANNEL", None, {}),
    "awq": ("llama", "W4A16_AWQ", None, {}),
    "w8a16": ("llama", "W8A16", None, {}),
    "moe": ("mixtral", None, None, {"num_hidden_layers": 2, "num_key_value_heads": 4}),
    "gemma3": ("gemma3", None, None, {}),
    "gemma3_w8a16": ("gemma3", "W8A16", None, {}),
    "qwen3_fp8_kv": ("qwen3", "FP8", "fp8", dict(TINY, hidden_size=128, intermediate_size=256,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=64)),
}


def unified(tmp_path, calib_text, case):
    from examples.tiny import make_tiny_model
    from quantize.calibrate import calibrate
    from quantize.unified import write_unified_checkpoint
    from test_pytorch_target import small

    family, algo, kv, overrides = CASES[case]
    if family == "llama":
        overrides = dict(TINY, **overrides)
    model = make_tiny_model(tmp_path / "hf", family=family, **overrides).float().eval()
    spec = small(algo, kv)
    if spec.needs_calibration:
        calibrate(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    write_unified_checkpoint(tmp_path / "hf", tmp_path / "u", spec,
                             calibrated_model=model if spec.needs_calibration else None,
                             progress=False)
    return tmp_path / "u"


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_lazy_equals_whole_for_every_module(tmp_path, calib_text, case):
    from verify.checkpoint import open_checkpoint
    from verify.unified_reader import load_unified

    d = unified(tmp_path, calib_text, case)
    config, (whole,) = load_unified(d)
    lazy_config, (lazy,) = open_checkpoint(d, lazy=True)
    assert lazy.tensors is None and lazy_config == config
    assert sorted(lazy.names) == sorted(whole)
    modules = sorted({n.rpartition(".")[0] for n in whole})
    for prefix in modules:  # one module at a time (get), then whole layers (hold)
        got = lazy.get(prefix)
        want = {n.rpartition(".")[2]: t for n, t in whole.items() if n.rpartition(".")[0] == prefix}
        assert set(got) == set(want), prefix
        bad = [k for k in want if not same(got[k], want[k])]
        assert not bad, f"{prefix}: {bad} differ"
    for i in range(config["num_hidden_layers"]):
        lazy.hold(lazy.layer_modules(i))
        held = {f"{p}.{k}": t for p in lazy.layer_modules(i) for k, t in lazy.get(p).items()}
        assert held and all(same(t, whole[n]) for n, t in held.items())
        lazy.release()


class ReadSpy:
    """Test double: wraps convert.source.SourceCheckpoint.read_bits (every tensor the lazy reader
    reads goes through it) and records the names read, then reads as the original does."""

    def __init__(self, monkeypatch):
        from convert.source import SourceCheckpoint

        self.names: list[str] = []
        real = SourceCheckpoint.read_bits

        def read(src, name, index=()):
            self.names.append(name)
            return real(src, name, index)

        monkeypatch.setattr(SourceCheckpoint, "read_bits", read)

    def take(self) -> set[str]:
        got, self.names = set(self.names), []
        return got


def test_lazy_read_touches_one_layer(tmp_path, calib_text, monkeypatch):
    """Opening reads headers only; holding layer i reads exactly layer i's unified tensors; the
    final norm reads only itself; the reference model's logits equal the whole reader's."""
    from safetensors import safe_open

    from verify.checkpoint import open_checkpoint
    from verify.model import ReferenceModel

    d = unified(tmp_path, calib_text, "fp8_kv")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        stored = list(f.keys())
    spy = ReadSpy(monkeypatch)
    _, (lazy,) = open_checkpoint(d, lazy=True)
    assert spy.take() == set()
    for i in range(TINY["num_hidden_layers"]):
        lazy.hold(lazy.layer_modules(i))
        assert spy.take() == {n for n in stored if n.startswith(f"model.layers.{i}.")}
        lazy.release()
    assert lazy.get("transformer.ln_f") and spy.take() == {"model.norm.weight"}

    ids = torch.tensor([byte_tokenizer(calib_text[:48]), byte_tokenizer(calib_text[900:948])])
    want = ReferenceModel(d).forward(ids)
    got = ReferenceModel(d, lazy=True).forward(ids)
    assert torch.equal(got, want)
