"""Per TensorRT-LLM model class (config.json's ``architecture``): the family spec whose names it
declares, its bias flags, and the config fields it needs.

Read in NVIDIA/TensorRT-LLM 1.x: ``models/__init__.py`` (``MODEL_MAP``: LlamaForCausalLM,
MistralForCausalLM and MixtralForCausalLM → ``LLaMAForCausalLM``; Qwen2ForCausalLM →
``QWenForCausalLM``), ``models/llama/model.py`` (``LLaMADecoderLayer``: ``Attention(bias=
config.attn_bias)``, whose dense bias follows it; ``GatedMLP`` or, with ``config.moe.num_experts``
> 0, ``MOE`` with ``bias=config.mlp_bias``), ``models/qwen/model.py`` (``QWenDecoderLayer``: q/k/v
bias always, no dense bias; the MLP width is ``intermediate_size`` for ``qwen_type`` qwen2 but
``intermediate_size // 2`` for the ``qwen`` default), ``models/modeling_utils.py``
(``PretrainedConfig.__init__``: keyword-only ``architecture``, ``dtype``, ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``; ``head_size`` defaults to ``hidden_size //
num_attention_heads``; ``from_dict`` looks up ``MODEL_MAP[config['architecture']]``).
"""
from __future__ import annotations

from dataclasses import dataclass

#: PretrainedConfig.__init__'s keyword-only arguments without a default
PRETRAINED_REQUIRED = ("architecture", "dtype", "hidden_size", "num_hidden_layers",
                       "num_attention_heads")


@dataclass(frozen=True)
class ModelClass:
    trtllm_class: str
    family: str                                   # model.families name
    biases: tuple[tuple[str, object], ...]        # spec bias flag -> config key (str) or a constant
    needs: tuple[tuple[str, str], ...] = ()       # (config field, why TensorRT-LLM needs it)
    moe: bool = False                             # built with MixtureOfExperts
    #: (config field, the values whose layout the family spec describes)
    values: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: the config field the MLP's (the experts') width is read from
    inter_key: str = "intermediate_size"


_LLAMA_BIASES = (("attn_bias", "attn_bias"), ("dense_bias", "attn_bias"), ("mlp_bias", "mlp_bias"))
_NO_BIASES = (("attn_bias", False), ("dense_bias", False), ("mlp_bias", False))
_VOCAB = ("vocab_size", "LLaMAModel / QWenModel build Embedding(config.vocab_size) and "
                        "lm_head from it")



def _qwen_moe_type(qwen_type: str) -> tuple[str, str]:
    return ("qwen_type", f"QWenConfig defaults it to 'qwen' (Qwen 1), a dense model: add "
                         f"\"qwen_type\": \"{qwen_type}\"")



_MOE = ("moe", "without a moe block MoeConfig has 0 experts and QWenDecoderLayer builds a dense "
               "GatedMLP, not the experts this checkpoint holds")
_MOE_INTER = ("moe_intermediate_size", "QWenDecoderLayer builds the experts this wide")

MODEL_CLASSES = {
    "LlamaForCausalLM": ModelClass("LLaMAForCausalLM", "llama", _LLAMA_BIASES, (_VOCAB,)),
    "MistralForCausalLM": ModelClass("LLaMAForCausalLM", "llama", _LLAMA_BIASES, (_VOCAB,)),
    "MixtralForCausalLM": ModelClass(
        "LLaMAForCausalLM", "mixtral", _LLAMA_BIASES,
        (_VOCAB, ("moe", "without a moe block MoeConfig has 0 experts and LLaMADecoderLayer "
                         "builds a dense GatedMLP (mlp.fc / mlp.gate / mlp.proj 2-D), not the "
                         "experts this checkpoint holds")), moe=True),
    "Qwen2ForCausalLM": ModelClass(
        "QWenForCausalLM", "qwen2", (("attn_bias", True), ("dense_bias", False),
                                     ("mlp_bias", "mlp_bias")),
        (_VOCAB, ("qwen_type", "QWenConfig defaults it to 'qwen' (Qwen 1), whose MLP is "
                               "intermediate_size // 2 wide: add \"qwen_type\": \"qwen2\"")),
        values=(("qwen_type", ("qwen2",)),)),
    # QWenDecoderLayer builds Attention(qk_layernorm=qwen_type == "qwen3"): attention.q_layernorm
    # / k_layernorm [head_size], no q/k/v bias (models/qwen/model.py)
    "Qwen3ForCausalLM": ModelClass(
        "QWenForCausalLM", "qwen3", (("attn_bias", False), ("dense_bias", False),
                                     ("mlp_bias", "mlp_bias")),
        (_VOCAB, ("qwen_type", "QWenConfig defaults it to 'qwen' (Qwen 1): without \"qwen_type\": "
                               "\"qwen3\" the q/k layernorms are not built")),
        values=(("qwen_type", ("qwen3",)),)),
    # QWenDecoderLayer, qwen_type qwen2_moe / qwen3_moe: MOE of width moe_intermediate_size in
    # every layer; qwen2_moe a SharedMoE (layers/moe.py: mlp.shared_expert MLP of width
    # moe_shared_expert_intermediate_size, mlp.shared_expert_gate RowLinear(hidden, 1)); qwen3_moe
    # the q/k layernorms; attn_bias fixed per type by QWenConfig.from_hugging_face
    "Qwen2MoeForCausalLM": ModelClass(
        "QWenForCausalLM", "qwen2_moe", (("attn_bias", True), ("dense_bias", False),
                                         ("mlp_bias", "mlp_bias")),
        (_VOCAB, _qwen_moe_type("qwen2_moe"), _MOE, _MOE_INTER,
         ("moe_shared_expert_intermediate_size", "SharedMoE builds mlp.shared_expert of this "
                                                 "width")),
        moe=True, values=(("qwen_type", ("qwen2_moe",)),), inter_key="moe_intermediate_size"),
    "Qwen3MoeForCausalLM": ModelClass(
        "QWenForCausalLM", "qwen3_moe", (("attn_bias", False), ("dense_bias", False),
                                         ("mlp_bias", "mlp_bias")),
        (_VOCAB, _qwen_moe_type("qwen3_moe"), _MOE, _MOE_INTER),
        moe=True, values=(("qwen_type", ("qwen3_moe",)),), inter_key="moe_intermediate_size"),
    # MODEL_MAP: Gemma2ForCausalLM / Gemma3ForCausalLM -> GemmaForCausalLM (models/gemma/model.py:
    # GemmaDecoderLayer, no linear biases; pre/post feed-forward norms and, for Gemma 3, q/k
    # layernorms as the family spec names them)
    "Gemma2ForCausalLM": ModelClass("GemmaForCausalLM", "gemma2", _NO_BIASES, (_VOCAB,)),
    "Gemma3ForCausalLM": ModelClass("GemmaForCausalLM", "gemma3", _NO_BIASES, (_VOCAB,)),
    # MODEL_MAP: Phi3ForCausalLM (models/phi3/model.py: Phi3DecoderLayer, no linear biases, the
    # swiglu MLP's fc of 2 x intermediate outputs; Phi3Model's Embedding has no tensor
    # parallelism: the whole vocabulary on every rank)
    "Phi3ForCausalLM": ModelClass("Phi3ForCausalLM", "phi3", _NO_BIASES, (_VOCAB,)),
    # MODEL_MAP: DeepseekV2ForCausalLM (models/deepseek_v2/model.py: no linear biases;
    # DeepseekV2Attention's fused_a / MLA parameters, a dense GatedMLP in layer 0 and SharedMoE
    # in the others); DeepSeekV2Config reads the MLA sizes and the yarn rotary_scaling
    "DeepseekV2ForCausalLM": ModelClass(
        "DeepseekV2ForCausalLM", "deepseek_v2", _NO_BIASES,
        (_VOCAB, ("moe", "DeepseekV2DecoderLayer builds MoE from config.moe (routed and shared "
                         "experts); without it every layer is a dense GatedMLP"),
         ("kv_lora_rank", "DeepseekV2Attention sizes fused_a, kv_b_proj and the latent KV cache "
                          "from it"),
         ("rotary_scaling", "DeepseekV2Attention reads rotary_scaling['beta_fast'] and the other "
                            "yarn fields unconditionally"),
         ("moe_inter_size", "the routed experts' intermediate size")), moe=True),
}


def model_class(architecture) -> ModelClass | None:
    return MODEL_CLASSES.get(architecture)


def bias_flags(mc: ModelClass, config: dict) -> dict[str, bool]:
    """The family spec's bias flags as this model class reads them from config.json."""
    return {flag: bool(config.get(src, False)) if isinstance(src, str) else src
            for flag, src in mc.biases}
