"""``from_hugging_face``: a Hugging Face config → TensorRT-LLM checkpoint ``config.json``.

Field names and meanings follow TensorRT-LLM 1.2's ``PretrainedConfig`` / ``LLaMAConfig`` /
``QWenConfig`` (``tensorrt_llm/models/{modeling_utils,llama/config,qwen/config}.py``) and what
nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint`` writes. Unknown keys inside ``mapping``
or ``quantization`` make TensorRT-LLM raise at load time, so those two blocks hold only known keys.
"""
from __future__ import annotations

from common.errors import UserError
from model.families import FAMILIES
from model.shape import model_shape, preflight

from .moe import moe_config, moe_layout

DTYPES = ("float16", "bfloat16", "float32")


def _rope(hf, own: tuple[str, ...] = ()) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) from transformers-4 ``rope_theta``/``rope_scaling`` or
    transformers-5 ``rope_parameters``. TRT-LLM reads the scaling dict's ``type`` key
    (``rope_type`` is the newer HF spelling), so both are written. ``own``: rope types the
    family's converter keys express (``Family.rope_types``): no scaling here."""
    params = getattr(hf, "rope_parameters", None)
    scaling = dict(params) if isinstance(params, dict) else None
    old = getattr(hf, "rope_scaling", None)
    if scaling is None and isinstance(old, dict):
        scaling = dict(old)
    theta = getattr(hf, "rope_theta", None)
    if theta is None and scaling is not None:
        theta = scaling.get("rope_theta")
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default") or kind in own:
            scaling = None
        else:
            if kind not in ("llama3", "linear", "dynamic"):
                raise UserError(f"rope scaling type {kind!r} is not supported; supported: llama3, "
                                f"linear, dynamic")
            scaling["type"] = kind
            scaling["rope_type"] = kind
    return float(theta), scaling


def resolve_dtype(dtype: str, hf) -> str:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype} is not one of auto, {', '.join(DTYPES)}")
        return dtype
    src = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    src = str(src).replace("torch.", "") if src is not None else None
    # float32 checkpoints build as float16 engines, as TensorRT-LLM's infer_dtype does.
    return src if src in ("float16", "bfloat16") else "float16"


def pp_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Layers of one pipeline stage: contiguous, the first stages take the remainder."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def from_hugging_face(hf, *, dtype: str = "auto", tp: int = 1, pp: int = 1,
                      quantization: dict | None = None, moe_tp: int | None = None,
                      moe_ep: int | None = None, pad_heads: bool = False) -> dict:
    """The TRT-LLM checkpoint config.json for ``hf`` (a transformers config). With head padding
    (``pad_heads`` and a tp that needs it) the head counts are the padded ones and ``head_size``
    (always written) no longer equals hidden_size / heads."""
    shape = preflight(model_shape(hf), tp, pp, pad_heads=pad_heads,
                      no_kv_duplication=str((quantization or {}).get("quant_algo") or "")
                      .startswith("W8A8_SQ"))
    moe = moe_layout(shape, tp, moe_tp, moe_ep)
    family = FAMILIES[shape.family]
    rotary_base, rotary_scaling = family.rotary(hf) if family.rotary else _rope(hf, family.rope_types)
    dtype = resolve_dtype(dtype, hf)
    arch = hf.architectures[0]
    config = {
        "architecture": arch,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.tp_heads,
        "num_key_value_heads": shape.tp_kv_heads,
        "head_size": shape.head_size,
        "intermediate_size": shape.inter,
        "hidden_act": getattr(hf, "hidden_act", None),
        "norm_epsilon": float(hf.rms_norm_eps),
        "max_position_embeddings": hf.max_position_embeddings,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "rotary_pct": 1.0,
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": shape.tied,
        "share_embedding_table": False,
        "attn_bias": shape.attn_bias,
        "mlp_bias": shape.mlp_bias,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": quantization or {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if shape.experts:
        # TensorRT-LLM's MoE layer takes the gated activation explicitly (LLaMAConfig: mixtral)
        config["hidden_act"] = "swiglu"
        config["moe"] = moe_config(shape)
        config["mapping"].update(moe_tp_size=moe.moe_tp, moe_ep_size=moe.moe_ep)
    if family.trtllm_config is not None:  # the family's converter's keys (model/families/)
        config.update(family.trtllm_config(hf, shape, tp))
    return config


def padded_hidden_fields(config: dict, shape) -> dict:
    """config.json's hidden fields when the hidden size is padded (``shape.padded_hidden``,
    model.spec.RESCALED_DIMS): ``hidden_size`` H' and ``norm_epsilon`` x H / H', which with the
    norm weights x sqrt(H / H') makes every RMSNorm over the padded features equal the model's
    (``head_size`` is always written, so the attention keeps its width); {} unpadded."""
    if not getattr(shape, "padded_hidden", None) or shape.padded_hidden == shape.hidden:
        return {}
    return {"hidden_size": shape.padded_hidden,
            "norm_epsilon": float(config["norm_epsilon"]) * shape.hidden / shape.padded_hidden}
