"""FP8 rowwise (``FP8_PER_CHANNEL_PER_TOKEN``): TensorRT-LLM's own convert_checkpoint.py
``--use_fp8_rowwise [--use_meta_fp8_rowwise_recipe]``. fp8 e4m3 weights with one float32 scale per
output channel, fp8 activations with one scale per token computed at run time: nothing is
calibrated. The converter quantizes each rank's float MLP weights as it writes them
(quantize/from_weights.py applies :meth:`Fp8Rowwise.quantize_weight`, the arithmetic is in
weights.py).

Which modules TensorRT-LLM 1.2 builds as FP8 rowwise (``fp8_rowwise_quantize`` in
``tensorrt_llm/quantization/quantize.py``): every RmsNorm, GatedMLP and Attention except those
matching ``exclude_modules`` (``*ln_f``, ``*ln_embed``, ``*lm_head`` always added); with
``use_meta_recipe`` also every ``*input_layernorm`` and ``*attention`` and the whole first and last
layer. Its Llama converter (``tensorrt_llm/models/llama/convert.py``) writes fp8 tensors for the
MLP linears only. So the two recipes here declare exactly the modules they write:

* ``mlp`` (default): every layer's MLP; ``exclude_modules: ["*attention", "*input_layernorm",
  "*ln_f", "*ln_embed", "*lm_head"]`` keeps attention and its norm in the model dtype;
* ``meta``: Meta's Llama 3.1 recipe, ``use_meta_recipe: true``: the MLPs of layers 1 .. L-2.
"""
from __future__ import annotations

from common.errors import UserError

from ...algos import FP8_ROWWISE
from ..base import Recipe
from ..parts import MemoryModel
from ..moe import MoeRefused

#: the recipes (--fp8-rowwise VALUE)
RECIPES = ("mlp", "meta")
#: what the MLP-only recipe leaves unquantized: attention and its norm, and the modules
#: ``fp8_rowwise_quantize`` of TensorRT-LLM 1.x always adds (written out: its earlier releases use
#: a given list as it is, and ln_f must not become an fp8-emitting norm in front of lm_head)
MLP_ONLY_EXCLUDES = ("*attention", "*input_layernorm", "*ln_f", "*ln_embed", "*lm_head")
#: the linears it quantizes (model spec names)
MLP_LINEARS = ("mlp.fc", "mlp.gate", "mlp.proj")
#: convert_checkpoint.py's ``args_to_quant_config``: ``clamp_val`` [-1200, 1200] (applied to the
#: weights before their scales and to the activations before theirs)
CLAMP_VAL = (-1200.0, 1200.0)


class Fp8Rowwise(Recipe):
    """fp8 weights per output channel, fp8 activations per token (dynamic); MLP linears."""
    lora_refusal = ("TensorRT-LLM's FP8 rowwise layers have no LoRA branch (the engine "
                    "build fails: NVIDIA/TensorRT-LLM #2603)")

    quant_algo = FP8_ROWWISE
    flag = "--fp8-rowwise"
    from_weights = True
    #: no calibration; 1-byte fp8 weights for the linears :meth:`quantizes_linear` names (the
    #: memory plan asks it per layer; the others stay the model dtype's); writing holds one
    #: linear's float32 copy at a time, inside the writer's staging budget
    memory = MemoryModel(weight_bytes=1.0)
    moe = MoeRefused("--fp8-rowwise is not supported for mixture-of-experts models: TensorRT-LLM's "
                     "MixtureOfExperts has no FP8 rowwise GEMM (layers/moe.py); use --fp8 or --awq")
    unified = None

    def flag_option(self, args) -> str | None:
        return getattr(args, "fp8_rowwise", None)

    def option(self, value: str | None) -> str:
        if value is None:
            return "mlp"
        if value not in RECIPES:
            raise UserError(f"--fp8-rowwise {value!r} is not a recipe; choose mlp or meta")
        return value

    def check_kv(self, kv: str | None) -> None:
        if kv is not None:
            raise UserError(f"--fp8-rowwise with --kv-cache-dtype {kv.lower()} is not supported: "
                            f"TensorRT-LLM's FP8 rowwise converter writes no calibrated KV-cache "
                            f"scale; drop --kv-cache-dtype, or use --fp8 --kv-cache-dtype fp8")

    def quantizes_linear(self, spec, layer: int, num_layers: int, linear: str) -> bool:
        if linear not in MLP_LINEARS:
            return False
        return spec.recipe_option != "meta" or 0 < layer < num_layers - 1

    def quantize_weight(self, spec, weight):
        from .weights import quantize_rowwise

        q, scale = quantize_rowwise(weight, CLAMP_VAL)
        return {"weight": q, "per_channel_scale": scale}

    def quantization_block(self, spec) -> dict:
        """TensorRT-LLM's QuantConfig fields, as its convert_checkpoint.py writes them."""
        meta = spec.recipe_option == "meta"
        return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": spec.kv_cache_quant_algo,
                "group_size": 128, "smoothquant_val": 0.5, "clamp_val": list(CLAMP_VAL),
                "use_meta_recipe": meta, "has_zero_point": False, "pre_quant_scale": False,
                "exclude_modules": None if meta else list(MLP_ONLY_EXCLUDES)}

    def unified_refusal(self, spec) -> str | None:
        return ("--fp8-rowwise has no unified checkpoint here (it writes TensorRT-LLM's MLP-only / "
                "Meta recipes; modelopt's unified FP8_PER_CHANNEL_PER_TOKEN quantizes every linear): "
                "use --target engine, or --fp8")

    def _weight_label(self, spec) -> str:
        return f"{self.quant_algo} ({spec.recipe_option or 'mlp'})"
