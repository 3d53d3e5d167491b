"""The parts a recipe (quantize/recipes/base.Recipe) is described with: its memory-plan
coefficients, how modelopt's unified export writes it, how modelopt's TensorRT-LLM export writes
its linears."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryModel:
    """A recipe's coefficients in the memory plan (quantize/memory.py; fitted there).

    ``weight_bytes``: bytes per linear weight in the checkpoint (None: the output dtype's);
    ``layer_factor``: calibration working memory per layer, in multiples of its weights;
    ``hooks``: calibrated by forward hooks without importing modelopt (the smaller host base);
    ``passes``: forward-loop passes whose outputs are held; ``search_inputs``: AWQ's search
    holds every batch's linear inputs; ``cpu_smoothing``: the layer is smoothed on the CPU in
    float32 when calibrating on a GPU; ``group_scales``: one scale per ``group_size`` weights of
    a row (AWQ), so the scales' share of the disk grows as the group shrinks."""

    weight_bytes: float | None = None
    layer_factor: float = 1.1
    hooks: bool = True
    passes: int = 1
    search_inputs: bool = False
    cpu_smoothing: bool = False
    group_scales: bool = False


@dataclass(frozen=True)
class UnifiedFormat:
    """How modelopt 0.47's unified export (``export_hf_checkpoint``) writes a recipe's format
    (quantize/unified/ reads it; the reader, verify/unified_reader.py, too).

    ``weight``: how a quantized linear weight is encoded (``int8_rows``, ``fp8``, ``int4``; None:
    float weights); ``fuse_shared_inputs``: preprocess_linear_fusion on q/k/v and gate/up;
    ``fold_into_norm``: fuse_prequant_layernorm (AWQ); ``from_float_weights``: no calibration,
    scales from the weights alone; ``per_tensor_weight_scale``: one weight scale per linear, which
    TensorRT-LLM's PyTorch backend re-quantizes to the max of a fused group (FP8);
    ``layerwise``: written layer by layer from the calibration store (else from the whole model
    calibrated in memory); ``quantization_config_extra``: convert_hf_quant_config_format's extra
    keys; ``writer_layers`` / ``writer_embedding``: the layer-by-layer writer's working memory in
    float32 copies of a decoder layer's linears / of the embedding table (quantize/memory.py;
    fitted to measured peaks)."""

    weight: str | None = None
    fuse_shared_inputs: bool = False
    fold_into_norm: bool = False
    from_float_weights: bool = False
    per_tensor_weight_scale: bool = False
    layerwise: bool = False
    quantization_config_extra: tuple = ()
    writer_layers: float | None = None
    writer_embedding: float = 0.0
    #: printed (stderr) after writing it: what a user of the checkpoint should know
    note: str | None = None
    #: its export of a mixture-of-experts model is reproduced too (the experts' tensors:
    #: quantize/unified/experts.py; calibrated with the whole model in memory)
    moe: bool = False


@dataclass(frozen=True)
class LinearExport:
    """How modelopt 0.47's export writes a modelopt-calibrated recipe's linears
    (quantize/modelopt_state.py). ``codec``: the weight's encoding, the key of modelopt_state's
    weight encoders ("int8": per channel, "fp8": per tensor, "int4": packed, group-wise);
    ``num_bits``: its weight quantizer's num_bits; ``fused``: the fusion groups (model spec) whose
    members share their input-side scales (``build_qkv`` always fuses q/k/v, ``build_mlp_config``
    gate/up for FP8); ``tensors``: the suffixes each quantized linear carries besides its bias."""

    codec: str
    num_bits: int | tuple[int, int]
    fused: tuple[str, ...]
    tensors: tuple[str, ...]
