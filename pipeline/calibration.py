"""Calibration of a conversion, and its tensors put into each rank's plan: the step between
planning a checkpoint (convert.convert.plan_checkpoint) and writing it, for calibrated formats.

Dense models calibrate layer by layer from the safetensors into a calibration store that the
writer streams from (modelopt's formats, or TensorRT-LLM's plugin SmoothQuant by forward hooks:
quantize.sq_layerwise); mixture-of-experts models are loaded and calibrated whole (their experts
have no layer-wise path yet)."""
from __future__ import annotations

import time
from pathlib import Path

from common.errors import UserError
from convert.hf_config import pp_layer_range
from quantize.head_padding import pad_quant_state, pad_sq_plugin_layers
from convert.moe import MoeLayout
from quantize.torch_io import TORCH_DTYPES
from model.families import FAMILIES
from quantize.apply import LayerShards, apply_to_plan, stage_tensors
from quantize.feature_padding import pad_feature_state
from quantize.calib_padding import calib_pad
from quantize.recipes import MAX, MODELOPT, SQ_HOOKS


def calibration_run(calibration, quant, shape, out_dir: Path):
    """The layer-wise calibration of this conversion, or None: every calibrated format on dense
    models goes layer by layer (a default run into a temporary store when none is given);
    mixture-of-experts models do not."""
    calibrated = quant is not None and quant.format.calibration(quant) is not None
    if not calibrated or shape.experts:
        if calibration is not None and calibration.reuse and calibrated:
            raise UserError("--calibration reuses a layer-wise calibration; a mixture-of-experts "
                            "model is calibrated whole: drop --calibration")
        return None
    if calibration is None:
        from quantize.run import CalibrationRun

        calibration = CalibrationRun(store=out_dir.with_name(out_dir.name + ".calibration"),
                                     temporary=True)
    return calibration


def planned(cplan, shape, rank_tensors) -> list:
    """Each rank's plan with its quantized tensors in place: ``rank_tensors(tp_rank, layers)``."""
    mapping = cplan.config["mapping"]
    tp, pp = mapping["tp_size"], mapping["pp_size"]
    out = []
    for r, plan in enumerate(cplan.plans):
        pp_rank, tp_rank = divmod(r, tp)
        out.append(apply_to_plan(plan, rank_tensors(tp_rank, pp_layer_range(shape.layers, pp,
                                                                            pp_rank))))
    return out


def calibrate_into_plan(model, cplan, shape, quant, calibration, *, progress: bool) -> dict:
    """Calibrate on the calibration text and replace ``cplan``'s quantized linears (and add the
    KV-cache scales); returns {"timings": {calibration, quantized_tensors}, "report": what the
    recipe chose (the SmoothQuant plugin's alphas)}."""
    dtype = TORCH_DTYPES[cplan.config["dtype"]]
    timings: dict = {}
    report: dict = {}
    t0 = time.perf_counter()
    if calibration is None:  # mixture of experts: the whole model
        rank_tensors = modelopt_tensors(model.directory, shape, quant, cplan.config, None,
                                        progress, dtype)
        t1 = time.perf_counter()
        cplan.plans = planned(cplan, shape,
                              lambda tp_rank, layers: stage_tensors(rank_tensors(tp_rank), layers))
        timings.update(calibration=t1 - t0, quantized_tensors=time.perf_counter() - t1)
        return {"timings": timings, "report": report}
    load_layer = calibration.calibrate(model.directory, cplan.source, quant, progress=progress,
                                       timings=timings, pad=calib_pad(shape))
    t1 = time.perf_counter()
    layer_shards = LAYER_SHARDS[quant.format.calibration(quant)]
    shards = layer_shards(calibration.store, load_layer, shape, quant, cplan.config, report, dtype)
    cplan.plans = planned(cplan, shape, lambda tp_rank, layers: shards.staged(layers, tp_rank))
    timings.update(quantized_tensors=time.perf_counter() - t1)
    return {"timings": timings, "report": report}


def modelopt_shards(store, load_layer, shape, quant, config, report, dtype):
    """modelopt's formats (and a KV cache alone) from a layer-wise calibration store: each
    layer's state read back, calibrated on the real heads and MLP, then padded, cut per rank."""
    return LayerShards(lambda i: padded_state(load_layer(i, dtype), shape), quant,
                       num_heads=shape.tp_heads, num_kv_heads=shape.tp_kv_heads,
                       tp=config["mapping"]["tp_size"], family=FAMILIES[shape.family])


def padded_state(state: dict, shape) -> dict:
    """Calibrated tensors of the real model padded as the checkpoint lays it out: heads
    (--pad-heads, quantize.head_padding), the MLP's intermediate features (quantize.feature_padding)."""
    heads = None if shape.calib_heads else shape.padding  # calibrated on the padded heads
    return pad_feature_state(pad_quant_state(state, heads), shape)


def sq_plugin_shards(store, load_layer, shape, quant, config, report, dtype):
    """TensorRT-LLM's plugin SmoothQuant from a layer-wise calibration store: each layer read
    back, its heads padded, cut per rank (quantize.apply.LayerShards)."""
    from quantize.smoothquant import plugin_layer_tensors, smoothquant_val
    from quantize.sq_layerwise import stored_alphas, stored_layer

    alphas, search = stored_alphas(store, shape.layers)
    config["quantization"]["smoothquant_val"] = smoothquant_val(alphas)
    report.update(alphas=alphas, **({"alpha_search": search} if search else {}))
    tp = config["mapping"]["tp_size"]
    heads = dict(num_heads=shape.tp_heads, num_kv_heads=shape.tp_kv_heads)

    def load(i):  # calibrated on the real heads, then padded
        return pad_sq_plugin_layers([stored_layer(load_layer(i, dtype), quant.quant_algo)],
                                    shape.padding)[0]

    def shard(i, layer, tp_rank):
        return plugin_layer_tensors(i, layer, quant, tp=tp, rank=tp_rank, norm_dtype=dtype, **heads)
    return LayerShards(load, quant, tp=tp, shard=shard, **heads)


#: the recipe's calibration method -> the per-layer tensors of its layer-wise store
LAYER_SHARDS = {SQ_HOOKS: sq_plugin_shards, MAX: modelopt_shards, MODELOPT: modelopt_shards}


def modelopt_tensors(model_dir, shape, quant, config, calibrated_model, progress, dtype):
    """modelopt's formats from a whole calibrated model (given, or loaded and calibrated here):
    the per-rank tensor function (dense and expert tensors, heads padded)."""
    from quantize.calibrate import calibrate
    from quantize.modelopt_state import extract_quant_state, shard_quant_state
    from quantize.moe import extract_moe_state, shard_moe_state

    model = calibrated_model
    if model is None:
        model = calibrate(model_dir, quant, progress=progress)
    state = extract_quant_state(model, quant, dtype=dtype)
    moe_state = extract_moe_state(model, quant, dtype) if shape.experts else {}
    del model
    state = padded_state(state, shape)  # calibrated on the real heads and MLP, then padded
    mapping = config["mapping"]
    tp = mapping["tp_size"]
    moe = MoeLayout(mapping.get("moe_tp_size", tp), mapping.get("moe_ep_size", 1))

    def rank_tensors(tp_rank):
        tensors = shard_quant_state(state, quant, num_heads=shape.tp_heads,
                                    num_kv_heads=shape.tp_kv_heads, tp=tp, rank=tp_rank,
                                    family=FAMILIES[shape.family])
        tensors.update(shard_moe_state(moe_state, moe, tp_rank, shape.experts))
        return tensors
    return rank_tensors
