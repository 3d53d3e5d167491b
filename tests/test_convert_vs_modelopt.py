"""Our checkpoint must hold exactly what nvidia-modelopt 0.47's export_tensorrt_llm_checkpoint
writes for the same model: tensor names, shapes, dtypes and values (modelopt is the format
reference; see docs/trtllm-format.md)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from convert_helper import convert_checkpoint


def modelopt_export(model, out_dir, tp: int, dtype=torch.float16, decoder_type="llama"):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    # modelopt drops rope theta with transformers >= 5 unless it is set here (known quirk).
    model.config.rope_theta = model.config.rope_parameters["rope_theta"]
    export_tensorrt_llm_checkpoint(model, decoder_type=decoder_type, dtype=dtype, export_dir=out_dir,
                                   inference_tensor_parallel=tp)
    return out_dir


def assert_same_checkpoint(ours, theirs, world):
    for r in range(world):
        a = load_file(ours / f"rank{r}.safetensors")
        b = load_file(theirs / f"rank{r}.safetensors")
        assert sorted(a) == sorted(b), f"rank {r}: names differ: {set(a) ^ set(b)}"
        for name in b:
            assert a[name].shape == b[name].shape, (r, name, a[name].shape, b[name].shape)
            assert a[name].dtype == b[name].dtype, (r, name, a[name].dtype, b[name].dtype)
            assert torch.equal(a[name], b[name]), f"rank {r}: {name} values differ"


@pytest.mark.parametrize("family,tp,kv,vocab,tied", [
    ("llama", 1, 4, 1000, False),
    ("llama", 2, 4, 1000, False),
    ("llama", 4, 4, 1000, False),
    ("llama", 4, 2, 1001, False),   # kv heads < tp (duplicated), vocab % tp != 0 (padded)
    ("llama", 2, 8, 999, True),     # MHA, tied embeddings
    ("mistral", 2, 2, 1000, False),
    ("qwen2", 2, 2, 1000, False),   # q/k/v bias
])
def test_fp16_matches_modelopt_export(tmp_path, tiny_model, family, tp, kv, vocab, tied):
    hf_dir, model = tiny_model(family, num_key_value_heads=kv, vocab_size=vocab,
                               tie_word_embeddings=tied, num_hidden_layers=3)
    ours = tmp_path / "ours"
    config = convert_checkpoint(hf_dir, ours, tp=tp, dtype="float16", progress=False)
    decoder = {"llama": "llama", "mistral": "llama", "qwen2": "qwen"}[family]
    theirs = modelopt_export(model, tmp_path / "modelopt", tp, decoder_type=decoder)
    assert_same_checkpoint(ours, theirs, tp)
    ref = json.loads((theirs / "config.json").read_text())
    for key in ("architecture", "dtype", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_size", "head_size", "intermediate_size",
                "vocab_size", "max_position_embeddings", "hidden_act", "norm_epsilon",
                "position_embedding_type", "rotary_base", "use_parallel_embedding",
                "embedding_sharding_dim", "mapping"):
        assert config[key] == ref[key], key
