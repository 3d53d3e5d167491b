"""``from_hugging_face``: a Hugging Face config → TensorRT-LLM checkpoint ``config.json``.

Field names and meanings follow TensorRT-LLM 1.2's ``PretrainedConfig`` / ``LLaMAConfig`` /
``QWenConfig`` (``tensorrt_llm/models/{modeling_utils,llama/config,qwen/config}.py``) and what
nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint`` writes. Unknown keys inside ``mapping``
or ``quantization`` make TensorRT-LLM raise at load time, so those two blocks hold only known keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.families import ARCHITECTURES, FAMILIES

from .config_json import normalised_config
from common.errors import UserError
from .heads import HeadPadding, choose_padding
from .moe import NORMALIZATION_RENORMALIZE, moe_config, moe_layout

# HF architecture -> family name (model.families)
SUPPORTED_ARCHITECTURES = ARCHITECTURES
DTYPES = ("float16", "bfloat16", "float32")


def read_hf_config(model_dir, *, auto_config: bool = False):
    """A local HF config as transformers' AutoConfig normalises it: read without transformers
    where ``convert.config_json`` reproduces that exactly, else (or with ``auto_config``) with
    AutoConfig; one clear line on any problem."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist: pass a local Hugging Face "
                        f"model directory (config.json + *.safetensors) or a bundled example name")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{model_dir / 'config.json'} is not valid JSON ({e}); re-download the model")
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"architecture {arch!r} in {model_dir / 'config.json'} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    fast = None if auto_config else normalised_config(raw)
    if fast is not None:
        return fast
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad config
        raise UserError(f"cannot read {model_dir / 'config.json'} with transformers: {e}")


def _rope(hf) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) from transformers-4 ``rope_theta``/``rope_scaling`` or
    transformers-5 ``rope_parameters``. TRT-LLM reads the scaling dict's ``type`` key
    (``rope_type`` is the newer HF spelling), so both are written."""
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
        if kind in (None, "default"):
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


@dataclass(frozen=True)
class Shape:
    """The numbers that decide how a model can be split."""

    family: str
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden: int
    inter: int
    vocab: int
    tied: bool
    attn_bias: bool    # q/k/v biases
    dense_bias: bool   # o_proj bias
    mlp_bias: bool
    vocab_multiple: int = 1  # the padded vocabulary is a multiple of this and of tp (AWQ: 64)
    experts: int = 0         # mixture of experts (convert.moe): experts per layer, 0 = dense MLP
    top_k: int = 0           # experts each token is routed to
    moe_normalization: int = 0  # TensorRT-LLM's ExpertScaleNormalizationMode (Mixtral: 1)
    padding: HeadPadding | None = None  # --pad-heads: zero heads added for tp (convert.heads)

    @property
    def tp_heads(self) -> int:
        """q heads as the checkpoint lays them out (padded when ``padding`` is active)."""
        return self.padding.padded_heads if self.padding else self.heads

    @property
    def tp_kv_heads(self) -> int:
        return self.padding.padded_kv_heads if self.padding else self.kv_heads

    @property
    def padded_vocab(self) -> int:
        """Vocabulary size before the tp split (see ``convert.shard.padded_vocab``)."""
        from .shard import padded_vocab

        return padded_vocab(self.vocab, 1, self.vocab_multiple)


def model_shape(hf) -> Shape:
    arch = hf.architectures[0]
    family = SUPPORTED_ARCHITECTURES[arch]
    heads = hf.num_attention_heads
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    llama_bias = bool(getattr(hf, "attention_bias", False))
    flags = dict(FAMILIES[family].flags)  # Qwen2: q/k/v bias always, no o_proj bias
    return Shape(
        family=family,
        layers=hf.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_size=head_size,
        hidden=hf.hidden_size,
        inter=hf.intermediate_size,
        vocab=hf.vocab_size,
        tied=bool(getattr(hf, "tie_word_embeddings", False)),
        attn_bias=flags.get("attn_bias", llama_bias),
        dense_bias=flags.get("dense_bias", llama_bias),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        **_moe_fields(hf, family),
    )


def _moe_fields(hf, family: str) -> dict:
    """Mixtral: num_local_experts, num_experts_per_tok; top-k then softmax (RENORMALIZE), as
    TensorRT-LLM's LLaMAConfig.from_hugging_face sets for model_type mixtral."""
    if family != "mixtral":
        return {}
    return dict(experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                moe_normalization=NORMALIZATION_RENORMALIZE)


def valid_tp_values(shape: Shape, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if not _tp_problem(shape, t)]


def _tp_problem(shape: Shape, tp: int) -> str | None:
    if shape.tp_heads % tp:
        return f"{shape.tp_heads} attention heads are not divisible by tp {tp}"
    kv = shape.tp_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        return f"{kv} key/value heads cannot be split over tp {tp} (need kv % tp == 0 or tp % kv == 0)"
    if shape.inter % tp and not shape.experts:  # experts: split by moe_tp (convert.moe)
        return f"intermediate size {shape.inter} is not divisible by tp {tp}"
    return None


def preflight(shape: Shape, tp: int, pp: int, *, pad_heads: bool = False,
              no_kv_duplication: bool = False, can_pad: bool = True) -> Shape:
    """Check the parallel layout before any weight is read; one line naming the numbers and the
    fix. Returns ``shape``, with its head padding set when ``pad_heads`` and tp needs it (never
    otherwise: a model whose heads tp divides is not padded). ``no_kv_duplication``: the format
    needs at least tp KV heads (SmoothQuant), which the padding then provides. ``can_pad=False``:
    a target that cannot pad (the refusal does not suggest --pad-heads)."""
    if tp < 1 or pp < 1:
        raise UserError(f"--tp and --pp must be >= 1 (got tp {tp}, pp {pp})")
    problem = _tp_problem(shape, tp)
    padding = None
    if problem:
        padding = choose_padding(shape.heads, shape.kv_heads, tp, no_kv_duplication=no_kv_duplication)
        if padding is not None and (not padding.active or _tp_problem(_padded(shape, padding), tp)):
            padding = None  # the heads split already, or the MLP does not: padding cannot help
    if problem and not (pad_heads and padding):
        valid = ", ".join(map(str, valid_tp_values(shape, max(8, tp))))
        fix = f"; or add --pad-heads to pad {padding.describe()}" if padding and can_pad else ""
        raise UserError(f"cannot split this model over tp {tp}: {problem}; valid --tp values: "
                        f"{valid}{fix}")
    if pp > shape.layers:
        raise UserError(f"--pp {pp} is larger than the model's {shape.layers} layers; "
                        f"use --pp between 1 and {shape.layers}")
    return _padded(shape, padding) if problem else shape


def _padded(shape: Shape, padding: HeadPadding) -> Shape:
    from dataclasses import replace

    return replace(shape, padding=padding)


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
    rotary_base, rotary_scaling = _rope(hf)
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
        "hidden_act": hf.hidden_act,
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
    if shape.family == "qwen2":
        config["qwen_type"] = "qwen2"
        config["seq_length"] = getattr(hf, "seq_length", 8192)
    return config
