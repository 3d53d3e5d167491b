"""TensorRT-LLM's plugin SmoothQuant formats (``--smoothquant``'s default recipe) against an independent
implementation of TensorRT-LLM 1.2's converter formulas written here (from
tensorrt_llm/models/llama/convert.py ``capture_activation_range`` / ``smooth_llama_model`` /
``generate_int8`` / ``get_tllm_linear_sq_weight`` and convert_utils ``smooth_gemm``; numpy where
TensorRT-LLM uses numpy, its [in, out] weight orientation, its per-rank splitting). The ranges are
captured here by our own forward hooks on the same calibration batches (and must equal the
converter's); every rank's tensors must then match: names, shapes, dtypes, int8 values exactly,
scales within float rounding, and the ``quantization`` block.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convert_helper import convert_checkpoint
from quantize.calibrate import make_calib_batches
from quantize.formats import QuantSpec
from quantize.smoothquant import capture_ranges
from quantize.sq_reference import calibrate_plugin
from quant_common import TINY, byte_tokenizer

VARIANTS = {  # quant_algo -> (per_channel, per_token), as convert_checkpoint.py's flags
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (True, True),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": (True, False),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": (False, True),
    "W8A8_SQ_PER_TENSOR_PLUGIN": (False, False),
}
CALIB = dict(calib_size=4, calib_seq_len=64, calib_batch_size=2)


# ----------------------------------------------------------------------------------------------
# The reference: TensorRT-LLM's formulas, restated
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def hook_ranges(model, batches):
    """capture_activation_range: per nn.Linear, max |x| per input and max |y| per output channel."""
    act = {}

    def stat(name, t, key):
        m = t.reshape(-1, t.shape[-1]).abs().max(dim=0)[0].float()
        act.setdefault(name, {})
        act[name][key] = m if key not in act[name] else torch.max(act[name][key], m)

    def hook(m, x, y, name):
        stat(name, x[0], "x")
        stat(name, y, "y")

    hs = [m.register_forward_hook(functools.partial(hook, name=n))
          for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    for b in batches:
        model(input_ids=b)
    for h in hs:
        h.remove()
    return act


def smooth_gemm(weights, x, alpha):
    """smooth_gemm: returns the smoother; weights are multiplied in place."""
    ws = torch.cat([w.abs().max(dim=0, keepdim=True)[0] for w in weights]).max(dim=0)[0]
    s = (x.to(float).pow(alpha) / ws.pow(1 - alpha)).clamp(min=1e-5)
    for w in weights:
        w.mul_(s.view(1, -1))
    return s


def generate_int8(weights, r, is_qkv=False, multi_query_mode=False):
    """generate_int8 (numpy), weights [in, out]."""
    weights = weights.detach().cpu().numpy()
    if is_qkv and not multi_query_mode:
        w_oq_t = 127. / r["w"].reshape(3, -1).max(dim=-1, keepdims=True)[0].cpu().numpy()
        w_oq_c = 127. / r["w"].reshape(3, -1).cpu().numpy()
    elif is_qkv:
        hidden_dim = weights.shape[0]
        kv_dim = (r["w"].shape[0] - hidden_dim) // 2
        sq, sk, sv = r["w"][:hidden_dim], r["w"][hidden_dim:hidden_dim + kv_dim], r["w"][-kv_dim:]
        w_oq_t = 127. / torch.stack([sq.max(), sk.max(), sv.max()]).cpu().numpy()
        w_oq_c = 127. / r["w"].cpu().numpy()
    else:
        w_oq_t = 127. / r["w"].max().cpu().numpy()
        w_oq_c = 127. / r["w"].cpu().numpy()
    w_qo_t, w_qo_c = 1.0 / w_oq_t, 1.0 / w_oq_c
    x_oq = np.array(127. / r["x"].max().item())
    y_oq = np.array(127. / r["y"].max().item())
    y_qo = np.array(r["y"].max().item() / 127.)
    ya_t = y_oq / (x_oq * w_oq_t)
    ya_c = y_oq / (x_oq * w_oq_c)
    if is_qkv and not multi_query_mode:
        ya_t = np.broadcast_to(ya_t, w_oq_c.shape)
        w_qo_t = np.broadcast_to(w_qo_t, w_oq_c.shape)
    if is_qkv and multi_query_mode:
        sizes = (sq.shape[0], sk.shape[0], sv.shape[0])
        ya_t = np.concatenate([np.broadcast_to(ya_t[i], n) for i, n in enumerate(sizes)])
        w_qo_t = np.concatenate([np.broadcast_to(w_qo_t[i], n) for i, n in enumerate(sizes)])
    to_i8 = lambda a: a.round().clip(-127, 127).astype(np.int8)  # noqa: E731
    w_int8 = to_i8(weights / w_qo_t) if (is_qkv and multi_query_mode) else to_i8(weights * w_oq_t)
    return {"weight.int8": w_int8, "weight.int8.col": to_i8(weights * w_oq_c),
            "scale_x_orig_quant": x_oq.astype(np.float32), "scale_w_quant_orig": w_qo_t.astype(np.float32),
            "scale_w_quant_orig.col": w_qo_c.astype(np.float32), "scale_y_accum_quant": ya_t.astype(np.float32),
            "scale_y_accum_quant.col": ya_c.astype(np.float32), "scale_y_quant_orig": y_qo.astype(np.float32)}


def sq_weight(vals, prefix, shape, tp, rank, *, is_qkv, per_token, per_channel, last_prefix,
              smoother=None, smoother_shape=None, cat_dim=0, mqa=False):
    """get_tllm_linear_sq_weight."""
    res = {}

    def mq_split(data):
        data = torch.as_tensor(np.ascontiguousarray(data))
        local = w.shape[0]
        head = (w.shape[1] - local) // 2
        q, k, v = torch.split(data, [local, head, head], dim=-1)
        return torch.cat([torch.chunk(t, tp, dim=-1)[rank] for t in (q, k, v)], dim=-1)

    col_shape = shape if (is_qkv or per_channel) else [1, 1]
    w = torch.as_tensor(vals["weight.int8.col" if per_channel else "weight.int8"])
    cur = mq_split(w) if mqa else torch.chunk(w, tp, dim=cat_dim)[rank]
    if is_qkv:
        cur = cur.reshape(cur.shape[0], -1)
    res[prefix + "weight"] = cur.t().contiguous()
    key = ("scale_w_quant_orig" if per_token else "scale_y_accum_quant") + (".col" if per_channel else "")
    val = vals[key]
    if (per_channel and smoother is None) or (not per_channel and is_qkv):
        val = mq_split(val) if mqa else torch.chunk(torch.as_tensor(np.ascontiguousarray(val)), tp, dim=cat_dim)[rank]
    val = val.numpy() if torch.is_tensor(val) else val
    res[prefix + "per_channel_scale"] = torch.as_tensor(np.array(val, dtype=np.float32)).reshape(col_shape)
    if per_token:
        if smoother is None:
            res[last_prefix] = torch.tensor([1.0], dtype=torch.float32)
    else:
        res[prefix + "act_scale"] = torch.tensor([[float(vals["scale_y_quant_orig"])]], dtype=torch.float32)
        res[last_prefix] = torch.tensor([float(vals["scale_x_orig_quant"])], dtype=torch.float32)
    if smoother is not None:
        res[prefix + "smoother"] = torch.chunk(smoother, tp, dim=cat_dim)[rank].reshape(smoother_shape).float()
    return res


def trtllm_rank(model, act, alpha, algo, tp, rank, dtype=torch.float16, int8_kv=False):
    """load_weights_from_hf_model's SmoothQuant tensors for one rank (after smooth_llama_model)."""
    per_channel, per_token = VARIANTS[algo]
    cfg = model.config
    mqa = cfg.num_key_value_heads != cfg.num_attention_heads
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    out = {}
    for i, layer in enumerate(model.model.layers):
        alpha_i = alpha[i] if isinstance(alpha, list) else alpha
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        a = {k[len(p):]: v for k, v in act.items() if k.startswith(p)}
        ln1 = layer.input_layernorm.weight.detach().clone()
        ln2 = layer.post_attention_layernorm.weight.detach().clone()
        sa, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]).detach().clone()
        s = smooth_gemm([qkv], a["self_attn.q_proj"]["x"], alpha_i)
        ln1.div_(s)
        r_qkv = {"x": a["self_attn.q_proj"]["x"] / s, "w": qkv.abs().max(dim=1)[0],
                 "y": torch.cat([a[f"self_attn.{n}_proj"]["y"] for n in "qkv"])}
        o = sa.o_proj.weight.detach().clone()
        s_o = smooth_gemm([o], a["self_attn.o_proj"]["x"], alpha_i)
        r_o = {"x": a["self_attn.o_proj"]["x"] / s_o, "w": o.abs().max(dim=1)[0], "y": a["self_attn.o_proj"]["y"]}
        g, u = mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()
        ws = torch.cat([g, u]).abs().max(dim=0)[0]
        s_m = (a["mlp.gate_proj"]["x"].to(float).pow(alpha_i) / ws.pow(1 - alpha_i)).clamp(min=1e-5)
        g.mul_(s_m.view(1, -1)), u.mul_(s_m.view(1, -1)), ln2.div_(s_m)
        r_g = {"x": a["mlp.gate_proj"]["x"] / s_m, "w": g.abs().max(dim=1)[0], "y": a["mlp.gate_proj"]["y"]}
        r_u = {"x": a["mlp.up_proj"]["x"] / s_m, "w": u.abs().max(dim=1)[0], "y": a["mlp.up_proj"]["y"]}
        d = mlp.down_proj.weight.detach().clone()
        s_d = smooth_gemm([d], a["mlp.down_proj"]["x"], alpha_i)
        r_d = {"x": a["mlp.down_proj"]["x"] / s_d, "w": d.abs().max(dim=1)[0], "y": a["mlp.down_proj"]["y"]}
        kw = dict(per_token=per_token, per_channel=per_channel)
        qkv_t = qkv.t()
        if not mqa:
            qkv_t = qkv_t.reshape(hidden, 3, hidden)
        out.update(sq_weight(generate_int8(qkv_t, r_qkv, True, mqa), t + "attention.qkv.",
                             [1, qkv.shape[0] // tp], tp, rank, is_qkv=True, cat_dim=-1, mqa=mqa,
                             last_prefix=t + "input_layernorm.scale_to_int", **kw))
        out.update(sq_weight(generate_int8(o.t(), r_o), t + "attention.dense.", [1, hidden], tp, rank,
                             is_qkv=False, last_prefix=t + "attention.quantization_scaling_factor",
                             smoother=s_o.float(), smoother_shape=[1, o.shape[1] // tp], cat_dim=0, **kw))
        out.update(sq_weight(generate_int8(u.t(), r_u), t + "mlp.gate.", [1, inter // tp], tp, rank,
                             is_qkv=False, last_prefix=t + "post_layernorm.scale_to_int", cat_dim=-1, **kw))
        out.update(sq_weight(generate_int8(g.t(), r_g), t + "mlp.fc.", [1, inter // tp], tp, rank,
                             is_qkv=False, last_prefix=t + "post_layernorm.scale_to_int", cat_dim=-1, **kw))
        out.update(sq_weight(generate_int8(d.t(), r_d), t + "mlp.proj.", [1, hidden], tp, rank,
                             is_qkv=False, last_prefix=t + "mlp.quantization_scaling_factor",
                             smoother=s_d.float(), smoother_shape=[1, inter // tp], cat_dim=0, **kw))
        out[t + "input_layernorm.weight"] = ln1.to(dtype)
        out[t + "post_layernorm.weight"] = ln2.to(dtype)
        if int8_kv:
            out[t + "attention.kv_cache_scaling_factor"] = (r_qkv["y"].max() / 127.).reshape([1])
    return out


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------

FLOAT_PLAN = ("vocab_embedding.weight", "ln_f.weight", "lm_head.weight", ".bias")


def assert_rank_equal(ours: dict, want: dict, where: str):
    extra = {n for n in set(ours) - set(want) if not n.endswith(FLOAT_PLAN)}
    assert set(want) <= set(ours) and not extra, (where, sorted(set(want) - set(ours)), sorted(extra))
    for name, b in want.items():
        a = ours[name]
        assert (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype), (where, name, a.shape, b.shape, a.dtype)
        if a.dtype == torch.int8:
            assert torch.equal(a, b), f"{where} {name}: int8 values differ at {int((a != b).sum())} places"
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-6, atol=0, msg=f"{where} {name}")


def run_case(tmp_path, model, hf_dir, calib_text, algo, tp, kv=None, alpha=None):
    spec = QuantSpec.create(algo, kv_cache_dtype=kv, smoothquant_alpha=alpha, **CALIB)
    cal = calibrate_plugin(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    out = tmp_path / f"ckpt-{algo}-{tp}"
    cfg = convert_checkpoint(hf_dir, out, tp=tp, quant=spec, calibrated_model=cal, progress=False)
    batches = make_calib_batches(byte_tokenizer(calib_text), spec.calib_size, spec.calib_seq_len,
                                 spec.calib_batch_size)
    act = hook_ranges(model, batches)
    ours = capture_ranges(model, batches)
    for name, r in act.items():
        assert torch.equal(ours[name]["x"], r["x"]) and torch.equal(ours[name]["y"], r["y"]), name
    a = spec.smoothquant_alpha if not spec.sq_alpha_search else list(cal.alphas)
    for rank in range(tp):
        want = trtllm_rank(model, act, a, algo, tp, rank, int8_kv=kv == "int8")
        assert_rank_equal(load_file(out / f"rank{rank}.safetensors"), want, f"{algo} tp{tp} rank{rank}")
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q == cfg["quantization"]
    val = a if not isinstance(a, list) else round(sum(a) / len(a), 4)
    assert (q["quant_algo"], q["smoothquant_val"], q["kv_cache_quant_algo"]) == (algo, val, kv and kv.upper())
    assert q["exclude_modules"] is None and q["group_size"] == 128  # QuantConfig's defaults
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("algo", list(VARIANTS))
def test_plugin_variant_equals_trtllm_formulas(tmp_path, tiny_model, calib_text, algo, tp):
    hf_dir, model = tiny_model("llama", **TINY)  # 8 heads, 4 kv heads: TensorRT-LLM's GQA branch
    run_case(tmp_path, model, hf_dir, calib_text, algo, tp)


def test_mha_qkv_and_int8_kv_cache_equal_trtllm_formulas(tmp_path, tiny_model, calib_text):
    """As many kv heads as heads (TensorRT-LLM's multi_query_mode=False qkv branch), INT8 KV cache
    (its scale: max |q, k, v output| / 127), Qwen2's q/k/v bias streamed unchanged, alpha 0.8."""
    hf_dir, model = tiny_model("qwen2", **(TINY | {"num_key_value_heads": 8}))
    out = run_case(tmp_path, model, hf_dir, calib_text, "W8A8_SQ_PER_TENSOR_PLUGIN", 2, kv="int8", alpha=0.8)
    bias = load_file(out / "rank1.safetensors")["transformer.layers.0.attention.qkv.bias"]
    sa = model.model.layers[0].self_attn
    want = torch.cat([b.detach().chunk(2)[1] for b in (sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias)])
    assert torch.equal(bias, want.half())


def test_smollm2_tp3_default_recipe_equals_trtllm_formulas(tmp_path, smollm2_dir, shared_text):
    """SmolLM2-135M (9 heads, 3 kv heads, hidden 576 = heads x head_size) at tp 3, default recipe."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    text = shared_text("shakespeare.txt", 4000)
    spec = QuantSpec.create("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", calib_size=2, calib_seq_len=32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cal = calibrate_plugin(model, spec, text, tokenizer=tok, progress=False)
    out = tmp_path / "sq3"
    convert_checkpoint(smollm2_dir, out, tp=3, quant=spec, calibrated_model=cal, progress=False)
    from quantize.calibrate import bos_if_added, tokenize_text

    batches = make_calib_batches(tokenize_text(text, tok), 2, 32, 1, bos_if_added(tok))
    act = hook_ranges(model, batches)
    for rank in range(3):
        want = trtllm_rank(model, act, 0.75, spec.quant_algo, 3, rank)
        assert_rank_equal(load_file(out / f"rank{rank}.safetensors"), want, f"smollm2 rank{rank}")


def test_alpha_search_picks_per_layer_minimum_and_writes_it(tmp_path, tiny_model, calib_text):
    """--smoothquant auto: each layer's alpha is the grid value with the smallest quantized-output
    error, and the checkpoint is TensorRT-LLM's formulas with those per-layer alphas."""
    from quantize.sq_search import ALPHA_GRID, search_alphas

    hf_dir, model = tiny_model("llama", **TINY)
    spec = QuantSpec.create("W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", smoothquant_alpha="auto", **CALIB)
    cal = calibrate_plugin(model, spec, calib_text, tokenizer=byte_tokenizer, progress=False)
    assert len(cal.alphas) == 2 and set(cal.alphas) <= set(ALPHA_GRID)
    errs = cal.search["per_layer_error"]
    batches = make_calib_batches(byte_tokenizer(calib_text), 4, 64, 2)
    ranges = capture_ranges(model, batches, keep_inputs=1024)
    for a in (0.5, 1.0):  # any fixed alpha does no better on any layer
        fixed, info = search_alphas(model, ranges, spec.quant_algo, grid=(a,))
        assert all(e <= f + 1e-12 for e, f in zip(errs, info["per_layer_error"]))
    run_case(tmp_path, model, hf_dir, calib_text, spec.quant_algo, 2, alpha="auto")


def test_reader_catches_a_wrong_smoother_or_scale(tmp_path, tiny_model, calib_text):
    """The reference reader simulates the plugin tensors: the written checkpoint is close to the
    float model, the same checkpoint with dense's smoother dropped to 1 or a static scale_to_int
    quartered is not."""
    from safetensors.torch import save_file

    from verify.reference import compare_with_hf, tolerance_for

    hf_dir, model = tiny_model("llama", **TINY)
    out = run_case(tmp_path, model, hf_dir, calib_text, "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", 1)
    good = compare_with_hf(out, model)["rel_err"]
    assert good < tolerance_for(json.loads((out / "config.json").read_text()))[0]  # --verify passes
    for name, change in (("transformer.layers.0.attention.dense.smoother", torch.ones_like),
                         ("transformer.layers.1.input_layernorm.scale_to_int", lambda t: t / 4)):
        tensors = load_file(out / "rank0.safetensors")
        tensors[name] = change(tensors[name])
        bad_dir = tmp_path / f"bad-{name}"
        bad_dir.mkdir()
        (bad_dir / "config.json").write_text((out / "config.json").read_text())
        save_file(tensors, bad_dir / "rank0.safetensors")
        assert compare_with_hf(bad_dir, model)["rel_err"] > 1.5 * good, name


def test_pytorch_target_takes_the_modelopt_recipe_only():
    import argparse

    from common.errors import UserError
    from quantize.flags import sq_algo

    ns = dict(sq_recipe=None, sq_activations=None, sq_weights=None, target="pytorch")
    assert sq_algo(argparse.Namespace(**ns)) == "W8A8_SQ_PER_CHANNEL"
    with pytest.raises(UserError, match="--target pytorch takes SmoothQuant only as --sq-recipe modelopt"):
        sq_algo(argparse.Namespace(**(ns | {"sq_activations": "token"})))
    assert sq_algo(argparse.Namespace(**(ns | {"target": "engine"}))) == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
