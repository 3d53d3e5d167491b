"""Issue 25: LoRA adapters. Random PEFT adapters (tests/lora_helper.py, made with peft) on the tiny
Llama: converted rows against a restatement of examples/hf_lora_convert.py's layout, the reference
reader with the converted rows against HF + PEFT and merge_and_unload (tp 1, 2, padded heads,
duplicated kv heads), the main command with --lora --verify, the engine options reaching
TensorRT-LLM's API (through the stand-in packages of tests/trtllm_api_doubles.py, TEST DOUBLES),
and every refusal (one line, exit 2, nothing written)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from builders.cli import main
from convert_helper import refused
from common.dtypes import BY_NAME
from convert.lora import convert_adapter
from lora_helper import ALL, make_adapter, peft_model
from model.families import FAMILIES
from model.lora import read_adapter
from model.source import ModelSource
from verify.lora_reader import LoraReferenceModel, verify_adapters

LLAMA = FAMILIES["llama"]


@pytest.fixture(scope="module")
def base(golden_llama):
    return golden_llama  # tests/conftest.py: tiny Llama, 8 heads / 4 kv heads, 2 layers


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """r 8 alpha 16 on every module (float32); r 4 rsLoRA alpha 12 on q, v, down (bfloat16);
    r 4 alpha 3 on k, o, gate, up (float16)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a8": make_adapter(base, root / "a8", r=8, alpha=16, seed=1),
        "a4rs": make_adapter(base, root / "a4rs", r=4, alpha=12, rslora=True,
                             targets=["q_proj", "v_proj", "down_proj"], dtype=torch.bfloat16,
                             seed=2),
        "a4": make_adapter(base, root / "a4", r=4, alpha=3, dtype=torch.float16, seed=3,
                           targets=["k_proj", "o_proj", "gate_proj", "up_proj"]),
    }


def _convert(base, adapter_dirs, out: Path, tp: int, dtype: str, pad_heads=False) -> Path:
    """A float checkpoint at ``tp`` and the adapters converted for it; the lora root."""
    from convert.convert import convert_checkpoint

    convert_checkpoint(base, out / "checkpoint", tp=tp, dtype=dtype, progress=False,
                       pad_heads=pad_heads)
    model = ModelSource.open(base)
    from pipeline.checkpoint import plan_layout
    from quantize.formats import QuantSpec

    layout = plan_layout(model, tp=tp, pp=1, quant=QuantSpec(), pad_heads=pad_heads)
    for i, d in enumerate(adapter_dirs, 1):
        a = read_adapter(d, i, LLAMA, model.shape, 64)
        convert_adapter(a, LLAMA, layout.shape, tp, BY_NAME[dtype], out / "lora" / str(i))
    return out / "lora"


def _st(path) -> dict:
    """The adapter's tensors as float32 numpy (torch's cast of its float16 / bfloat16)."""
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in
            load_file(str(Path(path) / "adapter_model.safetensors")).items()}


# --- the rows, against examples/hf_lora_convert.py's layout --------------------------------------

def test_rows_are_a_then_scaled_b_zero_padded(base, adapters, tmp_path):
    """tp 1, float32: row = A [r, in] then B x alpha/r [out, r] flattened, zero padded; config
    (module id, layer, r) with TensorRT-LLM's ids (mlp_h_to_4h = gate_proj = 5, mlp_gate =
    up_proj = 7); the rsLoRA adapter's B scaled by alpha / sqrt(r)."""
    root = _convert(base, [adapters["a8"], adapters["a4rs"]], tmp_path, 1, "float32")
    ids = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5,
           "down_proj": 6, "up_proj": 7}
    for task, name, scale in ((1, "a8", 16 / 8), (2, "a4rs", 12 / 4 ** 0.5)):
        w = np.load(root / str(task) / "model.lora_weights.npy")
        c = np.load(root / str(task) / "model.lora_config.npy")
        assert w.dtype == np.float32 and c.dtype == np.int32 and c.shape[2] == 3
        src = _st(adapters[name])
        want_rows = {}
        for key, a in src.items():
            m = re.match(r".*layers\.(\d+)\.\w+\.(\w+)\.lora_A\.weight", key)
            if m:
                b = src[key.replace("lora_A", "lora_B")]
                want_rows[(ids[m.group(2)], int(m.group(1)))] = (a, b * np.float32(scale))
        got = {(int(mid), int(layer)): (i, int(r)) for i, (mid, layer, r) in enumerate(c[0])}
        # a4rs targets q and v only: k is zero-filled (LoraManager.get_missing_qkv_modules)
        extra = set(got) - set(want_rows)
        assert all(mid == 2 for mid, _ in extra) and len(extra) == (2 if task == 2 else 0)
        for key, (a, b) in want_rows.items():
            i, r = got[key]
            n = a.size + b.size
            np.testing.assert_array_equal(w[0, i, :a.size], a.reshape(-1))
            np.testing.assert_allclose(w[0, i, a.size:n], b.reshape(-1), rtol=1e-6)
            assert not w[0, i, n:].any() and r == a.shape[0]
        for key in extra:
            assert not w[0, got[key][0]].any()


def test_bfloat16_rows_keep_their_bits(base, adapters, tmp_path):
    """A bfloat16 engine's rows are bfloat16 bits (``|V2``, TensorRT-LLM's torch_to_numpy form),
    equal to torch's float32 -> bfloat16 cast of A and alpha/r x B; never via float16."""
    root = _convert(base, [adapters["a8"]], tmp_path, 1, "bfloat16")
    w = np.load(root / "1" / "model.lora_weights.npy")
    c = np.load(root / "1" / "model.lora_config.npy")
    assert w.dtype == np.dtype("V2")
    src = _st(adapters["a8"])
    i = [k for k, (mid, layer, _) in enumerate(c[0]) if (mid, layer) == (7, 1)][0]  # up_proj
    a = torch.from_numpy(src["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"])
    b = torch.from_numpy(src["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]) * 2.0
    want = torch.cat([a.reshape(-1), b.reshape(-1)]).to(torch.bfloat16).view(torch.int16)
    got = torch.from_numpy(w[0, i].view(np.int16)[:want.numel()].copy())
    assert torch.equal(got, want)


# --- the reader with the rows = HF + PEFT --------------------------------------------------------

@pytest.mark.parametrize("tp,dtype", [(1, "float32"), (2, "float16")])
def test_reader_equals_hf_peft(base, adapters, tmp_path, tp, dtype):
    """Each converted adapter run by the reader (TensorRT-LLM's per-rank split) gives HF + PEFT's
    logits within the dtype's bound, and merge_and_unload's; the adapter moves the logits."""
    names = ["a8", "a4rs", "a4"]
    root = _convert(base, [adapters[n] for n in names], tmp_path, tp, dtype)
    reports = verify_adapters(tmp_path / "checkpoint", base, root,
                              [(i, adapters[n]) for i, n in enumerate(names, 1)])
    for report, ok in reports:
        assert ok, report
        if dtype == "float32":
            assert report["rel_err"] < 1e-5, report
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(5))
    ref = LoraReferenceModel(tmp_path / "checkpoint", root / "1")
    got = ref.forward(ids)[..., :1000]
    merged = peft_model(base, adapters["a8"], merge=True)(input_ids=ids).logits
    base_ref = LoraReferenceModel(tmp_path / "checkpoint", None).forward(ids)[..., :1000]
    rel = float((got - merged).norm() / merged.norm())
    moved = float((base_ref - merged).norm() / merged.norm())
    assert rel < (1e-5 if dtype == "float32" else 8e-3) and moved > 0.05, (rel, moved)


def test_padded_heads(tiny_model, tmp_path):
    """tp 2 over 6 heads / 3 kv heads with --pad-heads (8 / 4, as SmolLM2's 9 / 3 -> 12 / 4): B's
    rows (q, k, v) and A's columns (o) are zero where the padded heads are, in the engine's
    global layout."""
    base, _ = tiny_model(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    a = make_adapter(base, tmp_path / "a", r=4, alpha=8)
    root = _convert(base, [a], tmp_path / "out", 2, "float32", pad_heads=True)
    w = np.load(root / "1" / "model.lora_weights.npy")
    c = np.load(root / "1" / "model.lora_config.npy")
    q_row = [i for i, (mid, layer, _) in enumerate(c[0]) if (mid, layer) == (1, 0)][0]
    b = w[0, q_row, 4 * 48:4 * 48 + 64 * 4].reshape(64, 4)  # 8 padded heads x 8
    # the padded heads 6, 7 (a zero kv group) come last, on rank 1 (convert.shard.qkv)
    assert not b[48:64].any() and np.abs(b[:48]).min(axis=1).all()
    [(report, ok)] = verify_adapters(tmp_path / "out" / "checkpoint", base, root, [(1, a)])
    assert ok and report["rel_err"] < 1e-5, report


def test_duplicated_kv_heads(tiny_model, tmp_path):
    """tp 4 over 2 kv heads: each rank holds a copy of its kv head; the engine's attn_k / attn_v
    modules count one per rank (createLoraModules), and B's rows are laid out so (duplicated)."""
    base, _ = tiny_model(num_key_value_heads=2)
    a = make_adapter(base, tmp_path / "a", r=4, alpha=8)
    root = _convert(base, [a], tmp_path / "out", 4, "float32")
    [(report, ok)] = verify_adapters(tmp_path / "out" / "checkpoint", base, root, [(1, a)])
    assert ok and report["rel_err"] < 1e-5, report


# --- the main command ----------------------------------------------------------------------------

def test_cli_lora_verify_tp2(base, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--model", str(base), "--tp", "2", "--lora", str(adapters["a8"]),
               str(adapters["a4rs"]), "--verify", "--output", str(out), "--no-progress",
               "--triton-target", "none"])
    got = capsys.readouterr()
    text = got.out + got.err
    assert rc == 3, text  # no TensorRT-LLM here: everything but the engines
    assert re.search(r"verify: lora task 1 .*: PASS .* tp 2", text), text
    assert re.search(r"verify: lora task 2 .*: PASS .* tp 2", text), text
    assert "--lora-plugin float16 --max-lora-rank 8 --lora-target-modules attn_q attn_k " \
           "attn_v attn_dense mlp_h_to_4h mlp_4h_to_h mlp_gate" in text
    for task in ("1", "2"):
        assert sorted(p.name for p in (out / "lora" / task).iterdir()) == \
            ["adapter.json", "model.lora_config.npy", "model.lora_weights.npy"]
    rec = json.loads((out / "build.json").read_text())["options"]["lora"]
    assert rec["max_lora_rank"] == 8 and rec["dtype"] == "float16"
    assert [a["rank"] for a in rec["adapters"]] == [8, 4]
    assert rec["adapters"][1]["use_rslora"] and rec["adapters"][1]["scale"] == 6.0
    assert not (out / "lora.partial").exists()
    # build_engine lora OUTPUT: more adapters for these engines, next task id; above their
    # max_lora_rank: one line, exit 2, nothing written
    assert main(["lora", str(out), "--lora", str(adapters["a4"])]) == 0
    assert (out / "lora" / "3" / "model.lora_weights.npy").is_file()
    big = make_adapter(base, tmp_path / "r16", r=16, alpha=16)
    capsys.readouterr()
    assert main(["lora", str(out), "--lora", str(big)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"rank 16 is above --max-lora-rank 8", err[0]), err
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["1", "2", "3"]
    [(report, ok)] = verify_adapters(out / "checkpoint", base, out / "lora", [(3, adapters["a4"])])
    assert ok, report


def test_engine_options_reach_trtllm(base, adapters, tmp_path, fake_trtllm):
    """TEST DOUBLE (1.2 stand-in package): the worker passes the LoRA plugin's dtype to
    PluginConfig and lora_config (target modules, max rank, no lora_dir) to BuildConfig."""
    from builders.engine import build_engines
    from builders.engine_options import EngineOptions
    from engine_fakes import TwoGpus

    _convert(base, [], tmp_path, 2, "bfloat16")
    opts = EngineOptions(lora_plugin="bfloat16", max_lora_rank=8,
                         lora_target_modules=("attn_q", "attn_k", "attn_v", "mlp_gate"))
    res = build_engines(tmp_path / "checkpoint", tmp_path / "engines", opts, backend=TwoGpus())
    assert res.ok, res.message
    rec = json.loads((fake_trtllm / "rank1.json").read_text())
    assert rec["plugin_config"]["lora_plugin"] == "bfloat16"
    assert rec["build_config"]["lora_config"] == {
        "lora_dir": [], "lora_ckpt_source": "hf", "max_lora_rank": 8,
        "lora_target_modules": ["attn_q", "attn_k", "attn_v", "mlp_gate"], "max_loras": 4,
        "max_cpu_loras": 4}
    assert rec["build_config"]["kv_cache_type"] == "PAGED"


# --- refusals -----------------------------------------------------------------------------------


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_refusals(base, adapters, tiny_model, tmp_path, capsys):
    a8 = adapters["a8"]
    m = ["--model", str(base)]
    out = tmp_path / "out"
    pickled = tmp_path / "pickled"
    shutil.copytree(a8, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases = [
        (["--lora", str(pickled)], r"adapter_model.bin is a pickle.*safetensors"),
        (["--lora", str(_edit_config(a8, tmp_path / "dora", use_dora=True))],
         r"DoRA adapters \(use_dora\) are not supported.*merge_and_unload"),
        (["--lora", str(_edit_config(a8, tmp_path / "mts", modules_to_save=["lm_head"]))],
         r"modules_to_save \['lm_head'\] replace whole modules.*merge"),
        (["--lora", str(_edit_config(a8, tmp_path / "bias", bias="all"))], r"bias 'all'"),
        (["--lora", str(a8), "--max-lora-rank", "4"],
         r"rank 8 is above --max-lora-rank 4; raise --max-lora-rank to 8"),
        (["--max-lora-rank", "4"], r"--max-lora-rank applies with --lora"),
        (["--lora", str(a8), str(a8)], r"given twice"),
        # the capability table's LoRA cells (check/gpu.py): before any work on the engine
        # target, in the LoRA plan on the PyTorch target
        (["--lora", str(a8), "--smoothquant"], r"LoRA does not combine with SmoothQuant"),
        (["--lora", str(a8), "--fp8-rowwise"], r"LoRA does not combine with FP8 rowwise"),
        (["--lora", str(a8), "--target", "pytorch", "--smoothquant"],
         r"--lora with .*LoRA does not combine with SmoothQuant"),
        (["--lora", str(a8), "--kv-cache-type", "continuous"], r"--kv-cache-type paged"),
        (["--lora", str(tmp_path / "nowhere")], r"not a directory"),
    ]
    for extra, pattern in cases:
        refused(capsys, [*m, *extra], out, pattern)
    other, _ = tiny_model(hidden_size=32)  # an adapter of another model
    wrong = make_adapter(other, tmp_path / "wrong", r=4)
    refused(capsys, [*m, "--lora", str(wrong)], out,
            r"down_proj.lora_B.weight has shape \[32, 4\], the base model needs \[64, 4\] "
             r"\(r 4; is this adapter for another model\?\)")
    head = make_adapter(base, tmp_path / "head", r=4, targets=["q_proj", "lm_head"])
    refused(capsys, [*m, "--lora", str(head)], out, r"not a LoRA A/B weight of a decoder layer")
    ckpt = tmp_path / "ck"
    assert main([*m, "--output", str(ckpt), "--checkpoint-only", "--no-progress"]) == 0
    refused(capsys, ["--from-checkpoint", str(ckpt / "checkpoint"), "--lora", str(a8)], out,
            r"--lora needs --model.*build_engine lora")
    refused(capsys, ["--from-checkpoint", str(ckpt / "checkpoint"), "--lora-plugin",
                     "bfloat16", "--lora-target-modules", "attn_q", "--max-lora-rank", "8",
                      "--triton-target", "none"],
             out, r"--lora-plugin bfloat16 differs from the checkpoint's dtype float16")


def test_mixed_dtypes_refused(base, adapters, tmp_path):
    from safetensors.numpy import load_file, save_file

    from common.errors import UserError

    d = shutil.copytree(adapters["a8"], tmp_path / "mixed")
    t = load_file(str(d / "adapter_model.safetensors"))
    first = sorted(t)[0]
    t[first] = t[first].astype(np.float16)
    save_file(t, str(d / "adapter_model.safetensors"))
    shape = ModelSource.open(base).shape
    with pytest.raises(UserError, match=r"must all be one of float16, bfloat16, float32 "
                                        r"\(got F16, F32\)"):
        read_adapter(d, 1, LLAMA, shape)
    assert ALL  # the helper's module list covers q/k/v/o + gate/up/down


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_config_of_a_lora_engine(base, tmp_path, dtype):
    """The tensorrt_llm model of a LoRA engine: lora_weights in the engine dtype, the LoRA inputs
    routed from the ensemble, lora_cache_* from max_lora_rank and the adapters' bytes (one rank's
    q, k, v rows at r 8: 8 x (64 + 64/2) + 2 x 8 x (64 + 32/2) values x 2 layers x 2 bytes x 2
    adapters, rounded up to 1 MiB), lora_prefetch_dir only where TensorRT-LLM's loadNpy reads the
    dtype (not bfloat16)."""
    from builders.engine_options import EngineOptions
    from builders.triton.engine_config import engine_config_from_checkpoint, read_engine_config
    from builders.triton.inflight_batcher import engine_model_configs
    from builders.triton.options import TritonOptions

    _convert(base, [], tmp_path, 2, dtype)
    ckpt = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    opts = EngineOptions(lora_plugin=dtype, max_lora_rank=8,
                         lora_target_modules=("attn_q", "attn_k", "attn_v"))
    engine = read_engine_config(engine_config_from_checkpoint(ckpt, opts))
    assert engine.lora["adapter_bytes"] == (8 * 96 + 2 * 8 * 80) * 2 * 2
    cfgs = engine_model_configs(engine=engine, opts=TritonOptions(), engine_path="/e",
                                tokenizer_path="/t", batch=4, lora_adapters=2, lora_dir="/o/lora")
    llm = cfgs["tensorrt_llm"]
    want = {"bfloat16": "TYPE_BF16", "float16": "TYPE_FP16"}[dtype]
    assert [t["data_type"] for t in llm["input"] if t["name"] == "lora_weights"] == [want]
    params = {k: v["string_value"] for k, v in llm["parameters"].items()}
    assert params["lora_cache_max_adapter_size"] == params["lora_cache_optimal_adapter_size"] == "8"
    assert params["lora_cache_host_memory_bytes"] == str(1 << 20)
    assert params.get("lora_prefetch_dir") == (None if dtype == "bfloat16" else "/o/lora")
    ens = cfgs["ensemble"]
    assert {t["name"]: t["data_type"] for t in ens["input"] if t["name"].startswith("lora")} == \
        {"lora_task_id": "TYPE_UINT64", "lora_weights": want, "lora_config": "TYPE_INT32"}
    llm_step = ens["ensemble_scheduling"]["step"][1]["input_map"]
    assert llm_step["lora_weights"] == "lora_weights" and llm_step["lora_task_id"] == "lora_task_id"


def test_pytorch_target_lays_out_peft_adapters(base, adapters, tmp_path):
    """--target pytorch: the adapters, checked as for the engine, are copied as PEFT directories
    to OUTPUT/lora/<task id>/ and named in the LLM-API model.yaml's lora_config (TensorRT-LLM's
    LoraConfig: lora_dir, max_lora_rank, max_loras, max_cpu_loras)."""
    import filecmp

    import yaml

    out = tmp_path / "out"
    assert main(["--model", str(base), "--target", "pytorch", "--lora", str(adapters["a8"]),
                 str(adapters["a4rs"]), "--output", str(out), "--no-progress"]) == 0
    for task, name in ((1, "a8"), (2, "a4rs")):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert filecmp.cmp(adapters[name] / f, out / "lora" / str(task) / f, shallow=False)
    text = (out / "triton" / "tensorrt_llm" / "1" / "model.yaml").read_text()
    assert yaml.safe_load(text)["lora_config"] == {
        "lora_dir": [str(out / "lora" / "1"), str(out / "lora" / "2")], "max_lora_rank": 8,
        "max_loras": 2, "max_cpu_loras": 2}


@pytest.mark.slow
def test_done_when_command_on_smollm2(smollm2_dir, tmp_path, capsys):
    """The issue's command as typed, on the real SmolLM2-135M (`llama`: 9 -> 12 heads, 3 -> 4 KV
    heads padded for tp 2): `build_engine --model llama --tp 2 --lora A B --output out
    --verify` (with --dtype bfloat16: the rows as bfloat16 bits); A: r 8 on every module
    (float32), B: r 16 rsLoRA on attention only (bfloat16)."""
    a = make_adapter(smollm2_dir, tmp_path / "A", r=8, alpha=16, std=0.02, seed=1)
    b = make_adapter(smollm2_dir, tmp_path / "B", r=16, alpha=8, rslora=True, std=0.02, seed=2,
                     targets=["q_proj", "k_proj", "v_proj", "o_proj"], dtype=torch.bfloat16)
    out = tmp_path / "out"
    rc = main(["--model", "llama", "--tp", "2", "--lora", str(a), str(b), "--output", str(out),
               "--verify", "--no-progress", "--dtype", "bfloat16"])  # a bfloat16 engine
    got = capsys.readouterr()
    text = got.out + got.err
    assert rc == 3, text  # everything but the engines (no TensorRT-LLM here)
    assert "padded 9 -> 12 heads" in text
    for task in (1, 2):
        assert re.search(rf"verify: lora task {task} .*: PASS .*dtype bfloat16 tp 2", text), text
    rec = json.loads((out / "build.json").read_text())["options"]["lora"]
    assert rec["max_lora_rank"] == 16 and rec["dtype"] == "bfloat16"
    w = np.load(out / "lora" / "2" / "model.lora_weights.npy")
    assert w.dtype == np.dtype("V2") and w.shape[1] == 30 * 4  # 30 layers x q, k, v, o
