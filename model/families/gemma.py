"""Gemma 2 and Gemma 3 (text): the Llama linears with four norms per layer, GeGLU, and a
TensorRT-LLM ``config.json`` of their own.

What TensorRT-LLM 1.2's Gemma converter does (``tensorrt_llm/models/gemma/``), restated:

- ``convert.py`` ``load_gemma_weights`` (HF parser): every RMSNorm weight — ``input_layernorm``,
  ``post_attention_layernorm`` (-> ``post_layernorm``), ``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``, ``model.norm`` (-> ``ln_f``) and Gemma 3's ``q_norm`` /
  ``k_norm`` (-> ``attention.q_layernorm`` / ``k_layernorm``) — is written as ``w + 1`` (added in
  float32 for a bfloat16 source), because HF's Gemma norm multiplies by ``(1 + w)`` and
  TensorRT-LLM's RmsNorm by its weight: ``offset=1`` on every norm rule here. ``lm_head.weight``
  is always written (a copy of the embedding, split on the vocabulary); the embedding itself is
  written unscaled (``model.py`` ``GemmaModel.forward`` multiplies by sqrt(hidden_size) at run time).
- ``model.py`` ``GemmaDecoderLayer``: ``post_layernorm`` normalises the attention output, then
  ``pre_feedforward_layernorm`` feeds the MLP and ``post_feedforward_layernorm`` normalises its
  output (``inter_layernorms``); ``mlp.fc`` is HF ``gate_proj`` (the GELU branch), ``mlp.gate``
  ``up_proj``, as for Llama.
- ``config.py`` ``GemmaConfig.from_hugging_face``: see :func:`trtllm_fields`.
"""
from __future__ import annotations

from dataclasses import replace

from common.errors import UserError
from model.spec import Family, head_norm, norm

from .llama import ATTENTION, EMBED, HEAD, MLP

NORMS = (norm("input_layernorm", "input_layernorm", offset=1.0),
         norm("post_layernorm", "post_attention_layernorm", offset=1.0),
         norm("pre_feedforward_layernorm", "pre_feedforward_layernorm", offset=1.0),
         norm("post_feedforward_layernorm", "post_feedforward_layernorm", offset=1.0))
QK_NORMS = (head_norm("attention.q_layernorm", "self_attn.q_norm", offset=1.0),
            head_norm("attention.k_layernorm", "self_attn.k_norm", offset=1.0))
GEMMA_HEAD = (replace(HEAD[0], offset=1.0),) + HEAD[1:]
#: model.py GemmaModel.forward multiplies the embedding by sqrt(config.hidden_size): a padded
#: hidden_size would change that constant
HIDDEN_PADDING = ("TensorRT-LLM's Gemma scales the embedding by sqrt(hidden_size) "
                  "(tensorrt_llm/models/gemma/model.py), so a padded hidden size changes its output")
def _mlp():
    """Llama's MLP linears, fed by pre_feedforward_layernorm (where a smoother would fold)."""
    return tuple(lin if lin.norm is None else replace(lin, norm="pre_feedforward_layernorm")
                 for lin in MLP)


def _global_theta(hf, kind: str) -> float:
    """rope_theta of ``kind`` layers from transformers 5's per-layer-type ``rope_parameters``
    (``full_attention`` / ``sliding_attention``); a non-default rope type is refused: TensorRT-LLM's
    Gemma converter passes no rotary scaling (it reads ``rotary_scaling``, which HF never sets)."""
    params = getattr(hf, "rope_parameters", None) or {}
    p = params.get(kind, params) if isinstance(params, dict) else {}
    kind_of = p.get("rope_type", p.get("type", "default"))
    if kind_of not in (None, "default"):
        raise UserError(f"{hf.architectures[0]}: rope type {kind_of!r} for {kind} layers cannot be "
                        "expressed in TensorRT-LLM 1.2's Gemma checkpoint (its converter writes no "
                        "rotary scaling); only default RoPE is supported")
    theta = p.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise UserError(f"{hf.architectures[0]}: rope_parameters has no rope_theta for {kind}")
    return float(theta)


def sliding_pattern(hf) -> int | None:
    """The period TensorRT-LLM's Gemma 3 layer reads its window kind from (a layer is sliding
    iff ``(layer + 1) % pattern``, ``model.py`` GemmaDecoderLayer); None: every layer is full.
    Refused when ``layer_types`` is not that periodic pattern."""
    types = list(getattr(hf, "layer_types", None) or [])
    n = hf.num_hidden_layers
    if not types or all(t == "full_attention" for t in types):
        return None
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    pattern = full[0] + 1 if full else n + 1
    want = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if types != want or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"layer_types {types} is not a periodic sliding/full pattern; TensorRT-LLM "
                        "1.2's Gemma 3 expresses only 'full every N-th layer' (_sliding_window_pattern)")
    return pattern


def trtllm_windows(config: dict) -> list[int | None]:
    """Per layer, the attention window (None: the whole sequence) of a TensorRT-LLM checkpoint
    ``config`` — what the engine must be served with (``max_attention_window_size`` is a run-time
    setting; builders/triton writes it, verify/ masks with it). Gemma 3: TensorRT-LLM's own fields
    (a layer slides iff ``(layer + 1) % _sliding_window_pattern``, window ``sliding_window``);
    Gemma 2 and Phi-3: ``layer_types`` + ``sliding_window``, which this project adds to the config
    because TensorRT-LLM's configs for them carry no window at all; every other model: full."""
    n = int(config["num_hidden_layers"])
    arch, window = str(config.get("architecture")), config.get("sliding_window")
    pattern, types = config.get("_sliding_window_pattern"), config.get("layer_types")
    if not window:
        return [None] * n
    if arch == "Gemma3ForCausalLM" and pattern:
        return [int(window) if (i + 1) % int(pattern) else None for i in range(n)]
    if isinstance(types, list) and len(types) == n:
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [None] * n


def _common(hf, tp: int) -> dict:
    return {
        # config.py: use_parallel_embedding is forced to tp > 1; hidden_act comes verbatim from
        # the HF dict only where it has one (Gemma 2), else PretrainedConfig's default "gelu" —
        # TensorRT-LLM's gelu is the tanh approximation, HF's gelu_pytorch_tanh
        "use_parallel_embedding": tp > 1,
        "hidden_act": getattr(hf, "hidden_act", None) or "gelu",
        "rotary_scaling": None,
        "inter_layernorms": True,
        "query_pre_attn_scalar": hf.query_pre_attn_scalar,
        "final_logit_softcapping": hf.final_logit_softcapping,
    }


def gemma3_fields(hf, shape, tp: int) -> dict:
    """GemmaConfig.from_hugging_face for Gemma3ForCausalLM: the Gemma3ConfigGroup
    (``modeling_utils.py``): query_pre_attn_scalar, final_logit_softcapping,
    _sliding_window_pattern, rope_local_base_freq, sliding_window; ``rotary_base`` is the global
    (full-attention) theta."""
    if getattr(hf, "attn_logit_softcapping", None):
        raise UserError("Gemma 3 with attn_logit_softcapping: TensorRT-LLM 1.2's Gemma 3 layer "
                        "applies no attention soft-capping")
    pattern = sliding_pattern(hf)
    return dict(_common(hf, tp), rotary_base=_global_theta(hf, "full_attention"),
                _sliding_window_pattern=pattern if pattern is not None else hf.num_hidden_layers,
                rope_local_base_freq=_global_theta(hf, "sliding_attention"),
                sliding_window=hf.sliding_window)


def gemma2_fields(hf, shape, tp: int) -> dict:
    """GemmaConfig.from_hugging_face for Gemma2ForCausalLM: the Gemma2ConfigGroup
    (query_pre_attn_scalar, final_logit_softcapping, attn_logit_softcapping); one rope theta."""
    fields = dict(_common(hf, tp), rotary_base=_global_theta(hf, "full_attention"),
                  attn_logit_softcapping=hf.attn_logit_softcapping)
    types = list(getattr(hf, "layer_types", None) or [])
    if getattr(hf, "sliding_window", None) and "sliding_attention" in types:
        # not TensorRT-LLM's: the windows the engine must be served with (trtllm_windows)
        fields.update(sliding_window=hf.sliding_window, layer_types=types)
    return fields


#: what this project has proven for Gemma (tests/test_gemma.py, tests/test_gemma_quant.py:
#: calibrated formats equal modelopt 0.47's tensors; its AWQ export of a tied Gemma needs one
#: fix outside the tensors' math, described at test_gemma.modelopt_gemma_export). Not yet:
#: --target pytorch's calibrated unified formats.
FORMATS = {"engine": ((None, None), ("W8A16", None), ("W4A16", None), ("FP8", None), ("FP8", "FP8"),
                      ("W8A8_SQ_PER_CHANNEL", None), ("W8A8_SQ_PER_CHANNEL", "INT8"),
                      ("W4A16_AWQ", None), ("W4A8_AWQ", None), ("NVFP4", None), ("NVFP4", "FP8"),
                      (None, "FP8"), (None, "INT8")),
           "pytorch": ((None, None), ("W8A16", None), ("FP8", None), ("FP8", "FP8"), (None, "FP8"),
                       ("NVFP4", None), ("W4A16_AWQ", None), ("W8A8_SQ_PER_CHANNEL", None))}

#: TensorRT-LLM 1.2's Gemma converter (models/gemma/convert.py non_modelopt_quantize_if_needed)
#: makes its SmoothQuant plugin checkpoints by rebuilding the weights as a transformers Llama
#: model (models/gemma/smoothquant.py create_model_from_config, smooth_model), so it smooths and
#: calibrates a model without Gemma 2/3's feed-forward norms, q/k norms, soft-capping and windows
SQ_PLUGIN_REFUSAL = (("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                      "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
                      "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN"),
                     "TensorRT-LLM 1.2's Gemma converter makes SmoothQuant plugin checkpoints by "
                     "rebuilding the model as a Llama (models/gemma/smoothquant.py "
                     "create_model_from_config), without Gemma 2/3's feed-forward norms, q/k norms, "
                     "soft-capping and sliding windows; use --smoothquant --sq-recipe modelopt, "
                     "--fp8 or --awq")

GEMMA3 = Family("gemma3", ("Gemma3ForCausalLM",), EMBED, ATTENTION + _mlp(), NORMS, GEMMA_HEAD,
                qk_norms=QK_NORMS, trtllm_config=gemma3_fields, formats=FORMATS,
                format_refusals=(SQ_PLUGIN_REFUSAL,),
                modelopt_embedding=False, layerwise=False, hidden_padding=HIDDEN_PADDING)
GEMMA2 = Family("gemma2", ("Gemma2ForCausalLM",), EMBED, ATTENTION + _mlp(), NORMS, GEMMA_HEAD,
                trtllm_config=gemma2_fields, formats=FORMATS, format_refusals=(SQ_PLUGIN_REFUSAL,),
                modelopt_embedding=False, layerwise=False, hidden_padding=HIDDEN_PADDING)
