"""The family specs (model/): one place for names, fusion and shard rules, read by the plan, the
recipes, the unified writer and the verifier."""
from __future__ import annotations

import pytest

from model.shape import Shape, choose_padding
from convert.plan import rank_plan
from model.families import ARCHITECTURES, FAMILIES
from model.spec import (PER_BLOCK, PER_INPUT, PER_OUTPUT, PER_TENSOR, MlaDims, applies,
                        companion_axis, companion_layout, source_name)


def _shape(family: str, heads=8, kv=2, tp=1, pad=False) -> Shape:
    if family in ("deepseek_v2", "deepseek_v3"):  # MLA: one latent KV head, its own dims; a dense layer 0
        mla = MlaDims(q_lora=16 if kv == 2 else 0, kv_lora=16, nope=8, rope=8, v=8)
        return Shape(family=family, layers=2, heads=heads, kv_heads=1, head_size=24,
                     hidden=heads * 8, inter=96, vocab=100, tied=False, attn_bias=False,
                     dense_bias=False, mlp_bias=False, experts=4, top_k=2, mla=mla,
                     moe_inter=32, shared_inter=64, first_dense=1)
    return Shape(family=family, layers=2, heads=heads, kv_heads=kv, head_size=8, hidden=heads * 8,
                 inter=96, vocab=100, tied=False, attn_bias=True, dense_bias=True, mlp_bias=True,
                 experts=4 if FAMILIES[family].moe else 0, top_k=2,
                 shared_inter=48 if family == "qwen2_moe" else 0,
                 padding=choose_padding(heads, kv, tp) if pad else None)


class _Source:
    """Every HF tensor of the family at the shape its spec expects (no data: the plan reads none)."""

    dir = "fake"

    def __init__(self, shape: Shape):
        fam = FAMILIES[shape.family]
        self.shapes = {}
        for rule in fam.rules:
            layers = range(shape.layers) if "{i}" in rule.target else [None]
            experts = range(shape.experts) if rule.experts else [None]
            for i in layers:
                for e in experts:
                    for src in rule.sources:
                        name = source_name(src.format(i=i, e=e))  # a fused part: its tensor
                        self.shapes[name] = fam.expected_shape(name, shape)

    def __contains__(self, name):
        return name in self.shapes

    def shape(self, name):
        return self.shapes[name]


def test_registry_maps_every_architecture_to_its_family():
    assert ARCHITECTURES == {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                             "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral",
                             "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3",
                             "Gemma2ForCausalLM": "gemma2", "Phi3ForCausalLM": "phi3",
                             "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3",
                             "Qwen2MoeForCausalLM": "qwen2_moe",
                             "Qwen3MoeForCausalLM": "qwen3_moe"}
    assert dict(FAMILIES["qwen2"].flags) == {"attn_bias": True, "dense_bias": False}
    assert dict(FAMILIES["qwen3"].flags) == {"attn_bias": False, "dense_bias": False}


@pytest.mark.parametrize("name,offset", [("qwen3", 0.0), ("gemma3", 1.0)])
def test_qk_norms_are_per_head_replicated_layer_tensors(name, offset):
    """Qwen3's and Gemma 3's q/k norms: [head_size] rules in the layer (after attention.qkv),
    replicated, not linears (no recipe quantizes or smooths them), Gemma's written as 1 + w like
    its other norms; the other families have none."""
    family = FAMILIES[name]
    assert family.qk_norm_names() == {"self_attn.q_norm": "attention.q_layernorm",
                                      "self_attn.k_norm": "attention.k_layernorm"}
    s = _shape(name)
    assert family.expected_shape("model.layers.1.self_attn.q_norm.weight", s) == (s.head_size,)
    targets = [r.target for r in family.layer]
    qkv = targets.index("transformer.layers.{i}.attention.qkv.bias")  # (a bias rule, never used)
    assert targets[qkv + 1:qkv + 3] == ["transformer.layers.{i}.attention.q_layernorm.weight",
                                       "transformer.layers.{i}.attention.k_layernorm.weight"]
    assert all(r.shard == "replicated" and r.offset == offset for r in family.qk_norms)
    assert not any("norm" in h for h in family.hf_linears())
    assert all(not FAMILIES[f].qk_norms for f in ("llama", "qwen2", "mixtral", "gemma2"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_hf_source_has_an_expected_shape(family):
    s = _shape(family)
    for name, got in _Source(s).shapes.items():
        assert got is not None, name
    if s.mla is not None:  # no k_proj: the latent kv_a_proj_with_mqa (kv_lora + rope outputs)
        assert FAMILIES[family].expected_shape(
            "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", s) == (24, 64)
    else:
        fused = family == "phi3"  # one qkv_proj [q; k; v] (model.spec.FusedPart)
        name = "model.layers.1.self_attn." + ("qkv_proj" if fused else "k_proj") + ".weight"
        assert FAMILIES[family].expected_shape(name, s) == ((64 + 2 * 16) if fused else 16, 64)
    assert FAMILIES[family].expected_shape("model.layers.1.unknown.weight", s) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("heads,kv,tp,pad", [(8, 2, 1, False), (8, 2, 2, False), (8, 2, 4, False),
                                             (8, 8, 4, False), (6, 2, 4, True)])
def test_rank_features_are_the_planned_weight_shapes(family, heads, kv, tp, pad):
    """Linear.rank_features (what the weight-only and AWQ preflight checks) is the shape the float
    writer plans for each rank's weight."""
    s = _shape(family, heads, kv, tp, pad)
    if s.mla is not None and pad:
        pytest.skip("MLA heads are never padded (model.shape.preflight)")
    fam = FAMILIES[family]
    for rank in range(tp):
        plan = {t.name: t.shape for t in rank_plan(s, _Source(s), tp=tp, pp=1, rank=rank,
                                                   dtype="float16")}
        for lin in fam.dense_linears(s):
            i = next(i for i in range(s.layers) if applies(lin.when, s, i))  # its first layer
            assert plan[f"transformer.layers.{i}.{lin.name}.weight"] == lin.rank_features(s, tp)


def test_queries():
    llama = FAMILIES["llama"]
    lin, pos = llama.linear_of("mlp.up_proj")
    assert (lin.name, pos, lin.column_parallel) == ("mlp.gate", 0, True)
    assert llama.linear("attention.qkv").hf[2] == "self_attn.v_proj"
    assert not llama.linear("mlp.proj").column_parallel
    assert llama.fusion_groups() == {"qkv": ("self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj"),
                                     "gate_up": ("mlp.gate_proj", "mlp.up_proj")}
    assert [lin.name for lin in FAMILIES["mixtral"].dense_linears()] == ["attention.qkv",
                                                                          "attention.dense"]


@pytest.mark.parametrize("kind,ndim,numel,column,row", [
    ("weights_scaling_factor", 1, 1, None, None),     # FP8 per-tensor: replicated
    ("weights_scaling_factor", 1, 64, 0, None),       # SmoothQuant per output channel
    ("weights_scaling_factor", 2, 512, 0, 1),         # AWQ [out, in/group]: as the weight
    ("prequant_scaling_factor", 1, 64, None, -1),     # input side: split on row-parallel only
    ("smoother", 1, 64, None, -1),
    ("activation_scaling_factor", 1, 1, None, None),
    ("per_channel_scale", 2, 64, 0, None),
])
def test_companions_are_placed_by_the_linears_shard_rule(kind, ndim, numel, column, row):
    layout = companion_layout(kind, ndim, numel)
    assert layout in (PER_TENSOR, PER_OUTPUT, PER_INPUT, PER_BLOCK)
    assert companion_axis("column", layout) == column
    assert companion_axis("qkv", layout) == column
    assert companion_axis("row", layout) == row
    assert companion_axis("dense", layout) == row
