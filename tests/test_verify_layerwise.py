"""The verification room at any model size: the quality gate, --verify and --eval-ppl run the float
model and the checkpoint one decoder layer at a time (verify/float_model.py, verify/model.py) and
must give exactly what the whole-model computation gives: the float model loaded whole with
``from_pretrained(dtype=float32)`` and every rank file read whole, as the gate did before.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from convert_helper import convert_checkpoint
from quantize.formats import QuantSpec
from quantize.run import CalibrationRun
from quant_common import TINY, byte_tokenizer
from verify.float_model import float_logits, runs_layerwise
from verify.model import HEAD_CHUNK, ReferenceModel
from verify.quality_gate import measure

CALIB = dict(calib_size=4, calib_seq_len=64, calib_batch_size=2)


def whole_model_gate(ckpt, hf_dir, ids, seq_len=256) -> dict:
    """The gate as it was computed before (verify/quality_gate.py up to this change), restated:
    the whole fp32 HF model and the reader with every rank file in memory, window by window."""
    from transformers import AutoModelForCausalLM

    ref = ReferenceModel(ckpt)  # eager: all ranks in memory
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    wins = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    vocab = min(ref.vocab_size, hf.config.vocab_size)
    nll_q = nll_f = 0.0
    agree = count = 0
    with torch.no_grad():
        for i in range(wins.shape[0]):
            batch = wins[i:i + 1]
            lq = ref.forward(batch)[..., :vocab].double()
            lf = hf(input_ids=batch).logits[..., :vocab].double()
            target = batch[:, 1:, None]
            nll_q -= float(F.log_softmax(lq[:, :-1], -1).gather(-1, target).sum())
            nll_f -= float(F.log_softmax(lf[:, :-1], -1).gather(-1, target).sum())
            agree += int((lq.argmax(-1) == lf.argmax(-1)).sum())
            count += target.numel()
    ppl, fppl = math.exp(nll_q / count), math.exp(nll_f / count)
    return {"ppl": ppl, "float_ppl": fppl, "increase_pct": 100.0 * (ppl / fppl - 1.0),
            "top1_agreement": agree / wins.numel(), "tokens": count, "vocab": vocab}


def gate_ids(vocab=1000, n=1024, seed=1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def calibrated(tmp_path, hf_dir, calib_text, algo, *, tp=1, pp=1, **kw):
    spec = QuantSpec.create(algo, **CALIB, **kw)
    out = tmp_path / f"ckpt-{algo}-tp{tp}-pp{pp}"
    run = CalibrationRun(store=tmp_path / f"cal-{algo}-{tp}-{pp}", temporary=True, device="cpu",
                         calib_text=calib_text, tokenizer=byte_tokenizer)
    convert_checkpoint(hf_dir, out, tp=tp, pp=pp, dtype="float16", progress=False, quant=spec,
                       calibration=run)
    return out


def sq_plugin(tmp_path, hf_dir, calib_text, tp=1):
    from transformers import AutoModelForCausalLM

    from quantize.sq_reference import calibrate_plugin

    spec = QuantSpec.create("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", **CALIB)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cal = calibrate_plugin(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    out = tmp_path / f"ckpt-sq-plugin-tp{tp}"
    convert_checkpoint(hf_dir, out, tp=tp, quant=spec, calibrated_model=cal, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """TINY with 3 layers (pp 2 splits them 2 + 1)."""
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("hf_tiny3")
    make_tiny_model(d, **(TINY | {"num_hidden_layers": 3}))
    return d


@pytest.mark.parametrize("case", ["sq_plugin", "sq_plugin_tp2", "fp8_kv_fp8", "awq128", "sq_modelopt_pp2"])
def test_gate_layerwise_equals_whole_model(tmp_path, tiny3, calib_text, case):
    """Same ppl, float ppl and top-1 agreement, to the last bit, as the whole-model gate."""
    if case.startswith("sq_plugin"):
        ckpt = sq_plugin(tmp_path, tiny3, calib_text, tp=2 if case.endswith("tp2") else 1)
    elif case == "fp8_kv_fp8":
        ckpt = calibrated(tmp_path, tiny3, calib_text, "FP8", kv_cache_dtype="fp8")
    elif case == "awq128":
        ckpt = calibrated(tmp_path, tiny3, calib_text, "W4A16_AWQ")
    else:
        ckpt = calibrated(tmp_path, tiny3, calib_text, "W8A8_SQ_PER_CHANNEL", tp=2, pp=2, kv_cache_dtype="int8")
    ids = gate_ids()
    assert runs_layerwise(tiny3)
    got = measure(ckpt, tiny3, ids)
    want = whole_model_gate(ckpt, tiny3, ids)
    assert got == want
    assert got["tokens"] == 4 * 255 and got["ppl"] > 1


def test_float_side_layerwise_equals_from_pretrained_bitwise(tmp_path):
    """bf16 source, untied head longer than HEAD_CHUNK rows, batches of 2: torch.equal logits."""
    from transformers import AutoModelForCausalLM

    from examples.tiny import make_tiny_model

    d = tmp_path / "hf"
    make_tiny_model(d, dtype=torch.bfloat16, **(TINY | {"vocab_size": HEAD_CHUNK + 300,
                                                         "tie_word_embeddings": False}))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, HEAD_CHUNK + 300, (2, 40), generator=g) for _ in range(3)]
    with torch.no_grad():
        want = [hf(input_ids=b).logits for b in batches]
    got = list(float_logits(d, batches))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_lazy_reader_equals_eager_and_frees_each_layer(tmp_path, tiny3, calib_text):
    ckpt = calibrated(tmp_path, tiny3, calib_text, "FP8")
    eager, lazy = ReferenceModel(ckpt), ReferenceModel(ckpt, lazy=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (1, 50), generator=g) for _ in range(3)]
    held = []
    real_layer = lazy._layer

    def spy(p, i, *a):
        held.append(sorted({k.split(".")[2] for k in lazy.ranks[p][0]._held if k.startswith("transformer.layers.")}))
        return real_layer(p, i, *a)

    lazy._layer = spy
    got = list(lazy.forward_windows(batches))
    assert all(torch.equal(a, eager.forward(b)) for a, b in zip(got, batches, strict=True))
    assert held == [["0"]] * 3 + [["1"]] * 3 + [["2"]] * 3  # one layer resident at a time
    assert not any(r._held for row in lazy.ranks for r in row)


def test_mixtral_gate_keeps_the_float_model_whole(tmp_path):
    """Mixture of experts: the float side runs whole (its safetensors hold per-expert tensors that
    transformers fuses), the reader layer by layer; numbers equal the whole-model gate."""
    from examples.tiny import make_tiny_model

    d = tmp_path / "hf"
    make_tiny_model(d, family="mixtral", num_hidden_layers=2, num_key_value_heads=4)
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(d, ckpt, tp=2, dtype="float16", progress=False)
    assert not runs_layerwise(d)
    vocab = ReferenceModel(ckpt).vocab_size
    ids = gate_ids(vocab, 512)
    assert measure(ckpt, d, ids) == whole_model_gate(ckpt, d, ids)


def test_memory_plan_has_the_verification_stage_and_refuses_it(tmp_path, monkeypatch):
    """The quality gate after every calibration (and --verify / --eval-ppl) is a stage of the plan,
    flat in depth like the layer-wise calibration, refused in one line naming its own fix."""
    from common.errors import UserError
    from model.config import read_hf_config
    from model.shape import model_shape
    from examples.tiny import make_tiny_model
    from quantize import memory

    d = tmp_path / "hf"
    make_tiny_model(d, **TINY)
    shape = model_shape(read_hf_config(d))
    fp8 = QuantSpec.create("FP8")
    names = [s.name for s in memory.plan(shape, fp8, tp=1, pp=1, device="cpu")]
    assert names == ["calibration", "checkpoint", "verification"]
    assert [s.name for s in memory.plan(shape, None, tp=1, pp=1, device="cpu")] == ["checkpoint"]
    float_checks = memory.plan(shape, None, tp=1, pp=1, device="cpu", checks=memory.checks(True, "x"))
    verification = float_checks[-1]
    assert verification.name == "verification"
    deep = memory.verify_stage(dataclasses.replace(shape, layers=64), None, tp=1,
                               out_dtype_bytes=2, checks=[memory.GATE_TOKENS])
    assert deep.host == memory.verify_stage(shape, None, tp=1, out_dtype_bytes=2,
                                            checks=[memory.GATE_TOKENS]).host  # flat in depth
    monkeypatch.setenv("BUILD_ENGINE_MEMORY_LIMIT", str(int(verification.host - 1)))
    with pytest.raises(UserError, match="the verification stage needs .* drop --verify/--eval-ppl"):
        memory.check(float_checks, tmp_path, "cpu")
    monkeypatch.setenv("BUILD_ENGINE_MEMORY_LIMIT", str(int(verification.host + 1)))
    memory.check(float_checks, tmp_path, "cpu")
