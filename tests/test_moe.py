"""Mixture of experts (Mixtral): our checkpoint equals nvidia-modelopt 0.47's export tensor for
tensor at every MoE layout, its logits through the reference reader equal the Hugging Face model's,
and bad MoE layouts are refused before any work.

The format reference runs in a subprocess on transformers 4.57.1 (tests/hf4_export.py: modelopt's
export cannot walk transformers 5's fused experts). modelopt exports moe_tp = tp, moe_ep = 1 only;
for an expert-parallel layout the expected rank is modelopt's export at tp for everything but the
experts, and for ``mlp.fc`` / ``mlp.proj`` modelopt's export at tp = moe_tp, rank
``tp_rank // moe_ep``, cut to the expert block of ``moe_ep_rank = tp_rank % moe_ep`` (TensorRT-LLM's
``Mapping``: ``tensorrt_llm/mapping.py``; ``models/llama/convert.py``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_helper import convert_checkpoint
from hf4_export import hf4_dir

REPO = Path(__file__).resolve().parents[1]
EXPERTS = 4
# tp, moe_tp, moe_ep (None: TensorRT-LLM's defaults, moe_tp = tp, moe_ep = 1)
LAYOUTS = [(1, None, None), (2, 2, 1), (2, 1, 2), (4, 2, 2)]
EXPERT_TENSORS = ("mlp.fc.weight", "mlp.proj.weight")

needs_hf4 = pytest.mark.skipif(
    hf4_dir() is None, reason="the MoE format reference needs transformers 4.57.1 in "
    ".cache/hf4-transformers-4.57.1 (bash setup.sh installs it)")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """Tiny random Mixtral: 4 experts, top 2, 2 layers, 8 heads / 4 kv heads (GQA)."""
    from examples.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("hf_mixtral")
    model = make_tiny_model(d, family="mixtral", num_hidden_layers=2, num_key_value_heads=4)
    return d, model.float().eval()


def hf4_export(hf_dir, out_root, tps, ids=None, dtype="float16", extra=()):
    """Run tests/hf4_export.py (modelopt's export on transformers 4.57.1) in a subprocess;
    ``extra``: its calibration flags (--quant, --kv, --calib-text)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(hf4_dir())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, str(REPO / "tests" / "hf4_export.py"), str(hf_dir), str(out_root),
           "--dtype", dtype, *extra, "--tp", *map(str, tps)]
    if ids is not None:
        torch.save(ids, Path(out_root).parent / "ids.pt")
        cmd += ["--ids", str(Path(out_root).parent / "ids.pt")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(out_root)


@pytest.fixture(scope="module")
def modelopt_float(mixtral, tmp_path_factory):
    hf_dir, _ = mixtral
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    root = hf4_export(hf_dir, tmp_path_factory.mktemp("modelopt") / "export", [1, 2, 4], ids=ids,
                      extra=["--unified"])
    return root, ids


def expected_rank(root: Path, tp: int, moe_tp: int, moe_ep: int, r: int) -> dict:
    """modelopt's tensors for rank r of (tp, moe_tp, moe_ep); see the module docstring."""
    want = load_file(root / f"tp{tp}" / f"rank{r}.safetensors")
    experts = load_file(root / f"tp{moe_tp}" / f"rank{r // moe_ep}.safetensors")
    per = EXPERTS // moe_ep
    block = slice((r % moe_ep) * per, (r % moe_ep + 1) * per)
    for name in want:
        if name.endswith(EXPERT_TENSORS):
            want[name] = experts[name][block]
    return want


def assert_equal_tensors(got: dict, want: dict, where: str):
    assert sorted(got) == sorted(want), f"{where}: names differ: {set(got) ^ set(want)}"
    for name in want:
        a, b = got[name], want[name]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), (where, name, a.shape, b.shape, a.dtype,
                                                          b.dtype)
        assert torch.equal(a, b), f"{where}: {name} values differ"


@needs_hf4
def test_both_transformers_read_the_same_weights(mixtral, modelopt_float):
    """The tiny Mixtral saved by transformers 5 (per-expert w1/w2/w3 on disk) is the same model in
    transformers 4.57.1, which the format reference runs on."""
    _, model = mixtral
    root, ids = modelopt_float
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
    theirs = torch.load(root / "logits.pt")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@needs_hf4
@pytest.mark.parametrize("tp,moe_tp,moe_ep", LAYOUTS)
def test_float_equals_modelopt_export(tmp_path, mixtral, modelopt_float, tp, moe_tp, moe_ep):
    hf_dir, _ = mixtral
    root, _ = modelopt_float
    ours = tmp_path / "ours"
    config = convert_checkpoint(hf_dir, ours, tp=tp, moe_tp=moe_tp, moe_ep=moe_ep,
                                dtype="float16", progress=False)
    mt, me = moe_tp or tp, moe_ep or 1
    for r in range(tp):
        got = load_file(ours / f"rank{r}.safetensors")
        assert_equal_tensors(got, expected_rank(root, tp, mt, me, r), f"rank {r}")
        assert got["transformer.layers.0.mlp.router.weight"].dtype == torch.float32
        assert got["transformer.layers.0.mlp.fc.weight"].shape == (EXPERTS // me, 2 * 160 // mt, 64)
    ref = json.loads((root / f"tp{tp}" / "config.json").read_text())
    assert config["moe"] == ref["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": 1}
    assert config["mapping"] == dict(ref["mapping"], moe_tp_size=mt, moe_ep_size=me)
    for key in ("architecture", "dtype", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_size", "head_size", "intermediate_size",
                "vocab_size", "hidden_act", "norm_epsilon", "rotary_base",
                "position_embedding_type"):
        assert config[key] == ref[key], key


@pytest.mark.parametrize("tp,moe_tp,moe_ep", LAYOUTS)
def test_reader_logits_equal_hf(tmp_path, mixtral, tp, moe_tp, moe_ep):
    """fp16 checkpoint within fp16 rounding of HF MixtralForCausalLM (fp32); fp32 checkpoint to
    float32 reordering (rel < 1e-5)."""
    from verify.reference import verify

    hf_dir, model = mixtral
    for dtype, bound in (("float16", 16 * 2.0 ** -11), ("float32", 1e-5)):
        out = tmp_path / dtype
        convert_checkpoint(hf_dir, out, tp=tp, moe_tp=moe_tp, moe_ep=moe_ep, dtype=dtype,
                           progress=False)
        report, ok = verify(out, model)
        assert ok and report["rel_err"] < bound, report
        assert report["argmax_agreement"] == 1.0, report


def test_reader_catches_swapped_expert_halves(tmp_path, mixtral):
    """The check can fail: mlp.fc with w1 first (dense Llama's order) is a mismatch."""
    from verify.reference import verify

    hf_dir, model = mixtral
    out = tmp_path / "ckpt"
    convert_checkpoint(hf_dir, out, tp=1, dtype="float32", progress=False)
    path = out / "rank0.safetensors"
    t = load_file(path)
    for name in [n for n in t if n.endswith("mlp.fc.weight")]:
        up, gate = t[name].chunk(2, dim=1)
        t[name] = torch.cat([gate, up], dim=1).contiguous()
    save_file(t, path)
    report, ok = verify(out, model)
    assert not ok and report["rel_err"] > 1e-2, report


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "builders", *map(str, args)], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("overrides,flags,expect", [
    ({}, ["--tp", "8", "--moe-ep", "8"], "--moe-ep 8: the model's 4 experts are not divisible"),
    ({"intermediate_size": 162}, ["--tp", "4"],
     "--moe-tp 4: the experts' intermediate size 162 is not divisible"),
    ({}, ["--tp", "2", "--moe-tp", "2", "--moe-ep", "2"],
     "--moe-tp 2 x --moe-ep 2 = 4 but --tp is 2"),
    ({}, ["--tp", "2", "--moe-ep", "0"], "--moe-ep must be >= 1"),
])
def test_bad_moe_layout_refused_before_any_work(tmp_path, overrides, flags, expect):
    from examples.tiny import make_tiny_model

    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, family="mixtral", num_hidden_layers=1, **overrides)
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", "--no-progress",
                         *flags)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_engine: error: "), err
    assert expect in lines[0], lines[0]
    assert not out.exists()


def test_moe_flags_on_a_dense_model_refused(tmp_path, tiny_model):
    hf_dir, _ = tiny_model("llama", num_hidden_layers=1)
    out = tmp_path / "out"
    rc, _, err = run_cli("--model", hf_dir, "--output", out, "--checkpoint-only", "--tp", "2",
                         "--moe-ep", "2")
    assert rc == 2 and "this model has no experts" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@needs_hf4
def test_target_pytorch_equals_modelopt_unified_export(tmp_path, mixtral, modelopt_float):
    """--target pytorch (float): the unified checkpoint equals modelopt 0.47's export_hf_checkpoint
    (of the transformers-4 model; on transformers 5's fused experts it raises NotImplementedError)
    tensor for tensor, and --verify runs it through the reference reader."""
    hf_dir, _ = mixtral
    root, _ = modelopt_float
    out = tmp_path / "out"
    rc, stdout, err = run_cli("--model", hf_dir, "--output", out, "--target", "pytorch",
                              "--triton-target", "none", "--verify", "--no-progress")
    assert rc == 0, err
    assert "verify: PASS" in stdout
    ours = load_file(out / "hf_quantized" / "model.safetensors")
    theirs = load_file(root / "unified" / "model.safetensors")
    assert_equal_tensors(ours, theirs, "unified")


def test_target_pytorch_refuses_quantized_moe_and_moe_flags(tmp_path, mixtral):
    hf_dir, _ = mixtral
    for flags, expect in ((["--smoothquant"], "not supported for mixture-of-experts"),
                          (["--moe-ep", "2", "--tp", "2"], "--moe-tp/--moe-ep split a TRT-LLM")):
        out = tmp_path / "out"
        rc, _, err = run_cli("--model", hf_dir, "--output", out, "--target", "pytorch",
                             "--triton-target", "none", *flags)
        assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_routing_modes_follow_their_definitions():
    """RENORMALIZE (1): top-k logits then softmax over them = HF Mixtral's softmax, top-k,
    divide by the kept sum; NONE (0): softmax over all experts, top-k kept as they are."""
    from verify.reference_moe import MoeSpec, route

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 8, generator=g), torch.randn(6, 8, generator=g)
    probs = torch.softmax(x @ w.t(), dim=-1)
    top, ids = torch.topk(probs, 2, dim=-1)
    for mode, want in ((1, top / top.sum(-1, keepdim=True)), (0, top)):
        got_ids, got_w = route(x, w, MoeSpec(6, 2, mode, 1, 1))
        assert torch.equal(got_ids, ids)
        torch.testing.assert_close(got_w, want)
