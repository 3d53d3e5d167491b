"""What each format does for a mixture-of-experts model (Mixtral, Qwen-MoE): refusals before any work, the
``exclude_modules`` it writes, and which expert tensors calibration extracts (the extractors
themselves are in quantize/moe.py and quantize/moe_awq.py, keyed by :attr:`MoeSupport.experts`).

A format recipe names its :class:`MoeSupport` in its ``moe`` attribute; see quantize/moe.py's
docstring for the tensors of each format.
"""
from __future__ import annotations

from common.errors import UserError

from ...algos import AWQ_GROUP_SIZES


def _gemms(shape, layout) -> dict[str, tuple[int, int]]:
    """(input, output) features per rank of the experts' GEMMs."""
    inter = getattr(shape, "expert_inter", shape.inter) // layout.moe_tp  # DeepSeek: moe_inter
    return {"experts' mlp.fc": (shape.hidden, 2 * inter), "experts' mlp.proj": (inter, shape.hidden)}


class MoeSupport:
    """The float format: experts as they are, TensorRT-LLM's exclude_modules."""

    #: key of quantize/moe.py's expert extractors (None: no quantized expert tensors)
    experts: str | None = None
    #: calibrate on transformers 4's per-expert block (quantize/moe_blocks.py unfuse_experts)
    unfused_calibration = False

    def preflight(self, spec, shape, layout) -> None:
        """Refuse, before any work, what this format cannot write for these experts."""

    def exclude_modules(self, spec, shape) -> list[str] | None:
        """config.json's ``exclude_modules`` for a MoE model."""
        return None if spec.exclude_modules is None else list(spec.exclude_modules)


class MoeRefused(MoeSupport):
    """A format TensorRT-LLM's MoE layer has no GEMM for."""

    def __init__(self, message: str):
        self.message = message

    def preflight(self, spec, shape, layout) -> None:
        raise UserError(self.message)


class MoeWeightOnly(MoeSupport):
    """Weight-only experts: trtllm-build quantizes them; its GEMMs need (K, N) multiples."""

    def __init__(self, k_multiple: int, n_multiple: int):
        self.multiples = (k_multiple, n_multiple)

    def preflight(self, spec, shape, layout) -> None:
        k_mult, n_mult = self.multiples
        for name, (k, n) in _gemms(shape, layout).items():
            for what, v, mult in (("input", k, k_mult), ("output", n, n_mult)):
                if v % mult:
                    raise UserError(f"{spec.quant_algo}: {name} has {v} {what} features per rank, not a "
                                    f"multiple of {mult} as TensorRT-LLM's weight-only kernels "
                                    f"need; choose another --moe-tp or format")


class MoeCalibrated(MoeSupport):
    """modelopt-exported experts (FP8): each layer's router joins lm_head in exclude_modules, and
    a shared expert's gate (Qwen2-MoE: modelopt's export lists ``mlp.shared_expert_gate``)."""

    experts = "fp8"

    def exclude_modules(self, spec, shape) -> list[str] | None:
        if spec.exclude_modules is None:
            return None
        gates = ("router", "shared_expert_gate") if getattr(shape, "shared_inter", 0) else ("router",)
        return list(spec.exclude_modules) + [f"transformer.layers.{i}.mlp.{g}"
                                             for i in range(shape.layers) for g in gates]


class MoeAwq(MoeCalibrated):
    """AWQ experts: whole groups per rank (modelopt's export and TensorRT-LLM need them), then the
    weight-only kernels' multiples."""

    experts = "awq"
    unfused_calibration = True  # modelopt 0.47's AWQ search does not visit fused experts

    def preflight(self, spec, shape, layout) -> None:
        g = spec.group_size
        for name, (k, _) in _gemms(shape, layout).items():
            if k % g:
                alt = [a for a in AWQ_GROUP_SIZES if a != g and k % a == 0]
                fix = f"a --moe-tp that keeps it a multiple of {g}" if name.endswith("proj") \
                    else "another format"
                raise UserError(f"--awq: {name} input size per rank {k} is not a multiple of the "
                                f"AWQ group size {g}; choose {fix}"
                                + (f", or --awq-block-size {alt[0]}" if alt else ""))
        MoeWeightOnly(*spec.format.gemm_multiples).preflight(spec, shape, layout)


class MoeNvfp4(MoeCalibrated):
    """NVFP4 experts, exported expert by expert as dense NVFP4 linears (quantize/moe.py). TensorRT-LLM
    1.2's ``MOEWeightWrapper`` declares ``weights_block_scaling_factor_interleaved`` with the
    block scales' own shape [E, out, in/16], while ``block_scale_interleave`` (run by
    ``preprocess_weights``) pads each expert to [pad_up(out, 128), pad_up(in/16, 4)]: the two meet
    only when nothing is padded, so every expert GEMM must have a multiple of 128 outputs and of
    64 inputs per rank."""

    experts = "linear"

    def preflight(self, spec, shape, layout) -> None:
        for name, (k, n) in _gemms(shape, layout).items():
            if n % 128 or k % 64:
                raise UserError(f"--nvfp4: {name} has {k} input and {n} output features per rank; "
                                f"TensorRT-LLM 1.2's NVFP4 MoE layer needs multiples of 64 and 128 "
                                f"(its interleaved block scales are not padded); choose another "
                                f"--moe-tp or format")


#: TensorRT-LLM's MoE layer has no INT8 SmoothQuant GEMM and modelopt 0.47 cannot export it
SMOOTHQUANT_REFUSED = MoeRefused(
    "--smoothquant is not supported for mixture-of-experts models: "
    "TensorRT-LLM's MoE layer has no INT8 SmoothQuant GEMM and modelopt 0.47 "
    "cannot export it; use --fp8 or --int8-weight-only")
