"""Phi-3 / Phi-3.5-mini / Phi-4-mini (``Phi3ForCausalLM``): the Llama decoder with fused HF
projections, partial rotary and LongRoPE.

What TensorRT-LLM 1.2 does with it (``tensorrt_llm/models/phi3/``), restated:

- ``convert.py`` ``load_weights_from_hf_model``: ``self_attn.qkv_proj`` (HF rows [q; k; v]) is
  ``attention.qkv``; ``mlp.gate_up_proj`` (HF rows [gate; up], gate the SiLU branch) is written
  to ``mlp.fc`` with its halves swapped, [up; gate]; ``o_proj`` -> ``attention.dense``,
  ``down_proj`` -> ``mlp.proj``, ``post_attention_layernorm`` -> ``post_layernorm``.
- ``model.py`` ``Phi3DecoderLayer``: no linear biases; the MLP is ``layers/mlp.py`` ``MLP`` with
  ``hidden_act`` "swiglu": one ColumnLinear ``fc`` of 2 x intermediate outputs whose local output
  ``functional.swiglu`` splits in two halves, ``x, gate``, giving ``silu(gate) * x``. So each
  rank's ``mlp.fc`` is [its up rows; its gate rows] — both halves split over tp, one after the
  other (``Linear.fused``, the ``column`` rule over two sources), and its ``attention.qkv`` is
  [its q heads; its k heads; its v heads] cut from the fused ``qkv_proj`` (``FusedPart``).
  ``Phi3Model`` builds ``Embedding(config.vocab_size, hidden)`` with no tensor parallelism: every
  rank holds the whole, unpadded vocabulary embedding (``use_parallel_embedding`` false);
  ``lm_head`` is a ColumnLinear over the padded vocabulary, as for Llama.
- ``config.py`` ``Phi3Config.from_hugging_face``: see :func:`trtllm_fields`.

Phi-3-small (``Phi3SmallForCausalLM``: block-sparse attention, GeGELU, muP; ``REFUSED``) and
PhiMoE (``PhiMoEForCausalLM``, not part of this family) are other architectures, refused by
``model.config`` before any work.
"""
from __future__ import annotations

from common.errors import UserError
from model.spec import COLUMN, DENSE, QKV, ROW, WHOLE_VOCAB, Family, Linear, Rule

from .llama import HEAD, NORMS

#: Phi3Model's Embedding has no tp_size: whole on every rank, Embedding(config.vocab_size) rows
#: (AWQ's vocab_size is padded to a multiple of 64, as modelopt's export writes it)
EMBED = (Rule("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), WHOLE_VOCAB,
              shapes=(("vocab", "hidden"),)),)

LINEARS = (
    Linear("attention.qkv", ("self_attn.qkv_proj",), QKV,
           (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")), group="qkv",
           norm="input_layernorm", fused=(0, 1, 2)),
    Linear("attention.dense", ("self_attn.o_proj",), DENSE, (("hidden", "q"),)),
    Linear("mlp.fc", ("mlp.gate_up_proj",), COLUMN, (("inter", "hidden"), ("inter", "hidden")),
           group="gate_up", norm="post_attention_layernorm", fused=(1, 0)),
    Linear("mlp.proj", ("mlp.down_proj",), ROW, (("hidden", "inter"),)),
)

#: siblings refused in one line (model.config): what TensorRT-LLM 1.2 runs for them is not this spec
REFUSED = {"Phi3SmallForCausalLM": "Phi-3-small's block-sparse attention, GeGELU MLP and muP scaling "
                                   "(tensorrt_llm/models/phi3/phi3small) are not modelled by this "
                                   "project; Phi-3-mini / Phi-3.5-mini / Phi-4-mini "
                                   "(Phi3ForCausalLM) are"}

#: config.py: a max_position_embeddings of at least this makes the converter write long_rope
LONG_ROPE_MIN_POSITIONS = 128000


def _rope(hf) -> dict:
    """transformers 5 ``rope_parameters`` (or transformers 4 ``rope_theta`` / ``rope_scaling``)."""
    params = getattr(hf, "rope_parameters", None)
    rope = dict(params) if isinstance(params, dict) else {}
    old = getattr(hf, "rope_scaling", None)
    if not rope and isinstance(old, dict):
        rope = dict(old)
    rope.setdefault("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    rope.setdefault("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
    return rope


def _longrope(hf, rope: dict) -> dict:
    """The long_rope fields, refusing what TensorRT-LLM's LongRoPE tables cannot express: they
    scale cos/sin by sqrt(1 + ln(max / original) / ln(original)) (functional.py,
    RopeEmbeddingUtils.create_sinusoidal_positions_long_rope_for_attention_plugin; Phi-3 passes no
    mscale), which is HF's attention factor only when the config sets neither ``factor`` nor
    ``attention_factor`` otherwise."""
    original = rope.get("original_max_position_embeddings",
                        getattr(hf, "original_max_position_embeddings", None))
    short, long = rope.get("short_factor"), rope.get("long_factor")
    if not original or short is None or long is None:
        raise UserError("Phi3ForCausalLM longrope needs short_factor, long_factor and "
                        "original_max_position_embeddings in config.json")
    ratio = hf.max_position_embeddings / original
    factor = rope.get("factor")
    if rope.get("attention_factor") is not None or (factor is not None and factor != ratio):
        raise UserError("Phi3ForCausalLM longrope with its own factor / attention_factor: "
                        "TensorRT-LLM 1.2 scales by max_position_embeddings / "
                        "original_max_position_embeddings only; remove them or use --target pytorch")
    return {"position_embedding_type": "long_rope", "original_max_position_embeddings": original,
            "longrope_scaling_short_factors": [float(x) for x in short],
            "longrope_scaling_long_factors": [float(x) for x in long]}


def trtllm_fields(hf, shape, tp: int) -> dict:
    """Phi3Config.from_hugging_face (tensorrt_llm/models/phi3/config.py) for Phi3ForCausalLM:
    ``rotary_pct`` = partial_rotary_factor, ``rotary_base`` = rope theta, ``rotary_scaling``
    None, ``hidden_act`` "swiglu" for silu, ``tie_word_embeddings``, ``norm_epsilon`` =
    rms_norm_eps, ``position_embedding_type`` rope_gpt_neox, or long_rope with
    ``original_max_position_embeddings`` and the ``longrope_scaling_short_factors`` /
    ``longrope_scaling_long_factors``. The converter switches to long_rope for
    max_position_embeddings >= 128000 (every released longrope Phi); a longrope config below
    that is written as long_rope too (Phi3DecoderLayer reads the factors whenever present), since
    plain RoPE would not be the model. ``use_parallel_embedding`` false: Phi3Model's embedding is
    not split."""
    rope = _rope(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "longrope", "su"):
        raise UserError(f"Phi3ForCausalLM rope type {kind!r}: TensorRT-LLM 1.2's Phi-3 expresses "
                        "default RoPE and longrope only")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"Phi3ForCausalLM hidden_act {act!r}: TensorRT-LLM 1.2's Phi-3 MLP is "
                        "swiglu (silu) only")
    fields = {"hidden_act": "swiglu", "rotary_base": float(rope["rope_theta"]),
              "rotary_scaling": None, "rotary_pct": float(rope["partial_rotary_factor"]),
              "use_parallel_embedding": False, "position_embedding_type": "rope_gpt_neox"}
    if kind != "default":
        fields.update(_longrope(hf, rope))
    window = getattr(hf, "sliding_window", None)
    if window and window < hf.max_position_embeddings:
        # not TensorRT-LLM's: HF masks every layer to the window (Phi-3-mini-4k: 2047), which the
        # engine takes at run time (max_attention_window_size; model.families.gemma.trtllm_windows)
        fields.update(sliding_window=window,
                      layer_types=["sliding_attention"] * hf.num_hidden_layers)
    return fields


#: what this project has proven for Phi-3 (tests/test_phi3.py; calibrated: tests/test_phi3_quant.py,
#: against modelopt 0.47's export for decoder "phi3"). Not listed, refused: SmoothQuant (TensorRT-LLM
#: 1.2's Phi-3 converter has none), an INT8 KV cache beside a quantized GEMM format, W4A8-AWQ on
#: --target pytorch.
FORMATS = {"engine": ((None, None), ("W8A16", None), ("W4A16", None), (None, "FP8"), (None, "INT8"),
                      ("FP8", None), ("FP8", "FP8"), ("W4A16_AWQ", None), ("W4A16_AWQ", "FP8"),
                      ("W4A8_AWQ", None), ("NVFP4", None), ("NVFP4", "FP8")),
           "pytorch": ((None, None), ("FP8", None), ("FP8", "FP8"), (None, "FP8"),
                       ("W4A16_AWQ", None), ("W8A16", None), ("NVFP4", None), ("NVFP4", "FP8"))}

PHI3 = Family(
    "phi3", ("Phi3ForCausalLM",), EMBED, LINEARS, NORMS, HEAD,
    flags=(("attn_bias", False), ("dense_bias", False)),
    trtllm_config=trtllm_fields, formats=FORMATS, rope_types=("longrope", "su"),
    hidden_padding="TensorRT-LLM's Phi-3 embedding is not split and its fused mlp.fc halves are "
                   "not padded by this project yet")
