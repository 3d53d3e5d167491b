"""W4A8_AWQ (``--awq --awq-act fp8``): INT4 AWQ weights, group-wise, with FP8 (e4m3) activations.

Calibrated by modelopt's ``W4A8_AWQ_BETA_CFG`` (``awq_lite``; the weight quantizer is a
SequentialQuantizer: INT4 blocks, then one FP8 per-tensor stage; the input quantizer FP8 per
tensor), one decoder layer at a time as the INT4 AWQ recipe (quantize/layerwise.py), and
extracted as modelopt 0.47's ``export_tensorrt_llm_checkpoint`` writes it
(quantize/modelopt_state.py). Per quantized linear:

* ``weight`` int8 [out/2, in]: the int4 codes of the AWQ-smoothed weight, packed two to a byte
  along the output dim (modelopt's ``pack_int4_in_uint8`` with the INT4 stage's block scale);
* ``weights_scaling_factor`` float32 [out, in/group]: the INT4 stage's block amax / 7;
* ``weights_scaling_factor_2`` float32 [1]: the FP8 stage's amax / 448 (the weight's absolute
  maximum; q/k/v take the largest of the three, ``QKVConfig.weights_scaling_factor_2``);
* ``activation_scaling_factor`` float32 [1]: the input's FP8 amax / 448 (q/k/v: the largest);
* ``prequant_scaling_factor`` [in], in the checkpoint dtype: AWQ's smoothing (q/k/v averaged
  and the weights re-smoothed, ``preprocess_linear_fusion``).

TensorRT-LLM 1.x (``models/modeling_utils.py`` ``preprocess_weights``, W4A8_AWQ) then divides the
group scales by ``weights_scaling_factor_2`` (cast to float16, viewed as the model dtype),
divides ``prequant_scaling_factor`` by ``activation_scaling_factor`` and adds
``alpha = activation_scaling_factor * weights_scaling_factor_2``, the parameters
``WeightOnlyGroupwiseQuantLinear(use_w4a8_awq=True)`` declares (``quantization/layers.py``; the
row linear also ``activation_scaling_factor``). Those linears pad their features to a multiple of
max(128, group) x tp (64 for W4A16).
"""
from __future__ import annotations

import copy

from ...algos import W4A8_AWQ
from ..modelopt import Awq, set_awq_block_size
from ..moe import MoeRefused
from ..parts import LinearExport, UnifiedFormat

#: the tensors modelopt's TensorRT-LLM export writes per W4A8_AWQ linear
W4A8_TENSORS = ("weight", "weights_scaling_factor", "weights_scaling_factor_2",
                "activation_scaling_factor", "prequant_scaling_factor")


class W4A8Awq(Awq):
    """W4A8_AWQ: INT4 AWQ group-wise weights, FP8 activations with one static scale per linear."""

    quant_algo = W4A8_AWQ
    flag = "--awq"  # with --awq-act fp8 (Awq.resolve_flags picks this recipe)
    moe = MoeRefused("--awq --awq-act fp8 (W4A8_AWQ) is not supported for mixture-of-experts models "
                     "yet (its expert tensors are not modelled); use --awq or --fp8")
    #: modelopt's unified W4A8 AWQ: AWQ's (q/k/v and gate/up fused, their pre_quant_scale folded
    #: into the norms) plus ``weight_scale_2`` and ``input_scale``; from the whole model calibrated
    #: in memory (the calibration store keeps no second weight stage)
    unified = UnifiedFormat(weight="int4", fuse_shared_inputs=True, fold_into_norm=True)
    linear_export = LinearExport("int4", 4, ("qkv",), W4A8_TENSORS)

    def resolve_flags(self, args) -> str:
        return self.quant_algo

    def feature_multiple(self, spec) -> int:
        """``WeightOnlyGroupwiseQuantLinear`` / ``RowLinear`` with ``use_w4a8_awq``
        (tensorrt_llm/quantization/layers.py, 1.x): max(128, group_size) x tp."""
        return max(128, spec.group_size)

    def feature_fix(self, spec) -> str:
        return "use --awq alone (W4A16_AWQ pads to a multiple of max(64, group) x tp) or --fp8"

    def _modelopt_weights(self, spec, mtq) -> dict:
        cfg = copy.deepcopy(mtq.W4A8_AWQ_BETA_CFG)
        set_awq_block_size(cfg, spec.group_size)
        return cfg
