"""The memory plan: before any work, the expected peak host RAM, device memory and output disk of
each stage, from the model's shape, the format, the calibration size and the device; a build that
cannot fit is refused with the numbers (one line, exit 2, nothing written) instead of being
OOM-killed an hour in.

The figures are a model of the layer-wise calibration (quantize/layerwise.py; the plugin
SmoothQuant recipe's quantize/sq_layerwise.py): a fixed process base plus one decoder layer
(weights in the compute dtype and modelopt's or the smoothing's working copies), the
calibration activations (layer inputs and, per forward-loop pass, outputs), one batch's forward
temporaries and the embedding rows the calibration ids use. The verification stage (the quality gate after every
calibration, ``--verify``, ``--eval-ppl``: verify/) runs the float model and then the checkpoint one
layer at a time too: one float32 layer, the windows' hidden states, one batch's logits. The coefficients are fitted to the
measured peaks in BENCHMARKS.md (benchmarks/bench_layerwise.py), which checks them.

``BUILD_ENGINE_MEMORY_LIMIT`` (bytes, or with a K/M/G suffix) replaces the host RAM this machine
has available (for tests, and to keep a build inside a share of a machine).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import UserError
from common.fileio import DIRECT_BUFFER, DIRECT_BUFFERS
from convert.compute import COMPUTED
from model.families import FAMILIES
from model.shape import padded_vocab
from model.spec import DIMS, REPLICATED, applies

from .recipes import recipe_for

GB = 1e9
#: RSS of a process that has imported torch, transformers and modelopt (measured 0.50 GB) plus
#: the converter's writer: its O_DIRECT staging buffers (common/fileio.py) and ~0.07 GB besides
#: (the float converter peaks at 0.59 GB in all with 4 x 128 MiB buffers, 0.20 GB with 4 x 32 MiB).
HOST_BASE = 0.62 * GB
WRITE_BASE = 0.07 * GB + DIRECT_BUFFERS * DIRECT_BUFFER
CUDA_CONTEXT = 0.6 * GB
#: working memory per layer, in multiples of the layer's weights, and the bytes per weight of each
#: format's quantized linears: each recipe's ``memory`` (quantize/recipes/, ``MemoryModel``),
#: fitted as above: modelopt's for SmoothQuant (1.6) and AWQ (1.8); for FP8 the forward-hook max
#: calibration's (quantize/max_layerwise.py: the float32 layer only, its fp8 weights made in blocks;
#: fitted: 8B-shaped, 4 x 64 tokens, CPU: 1.49 / 1.50 GB peak RSS at 4 / 16 layers): 1.0; a KV
#: cache alone: 1.1, as fitted for modelopt; TensorRT-LLM's plugin SmoothQuant, layer by layer
#: (quantize/sq_layerwise.py): 1.0, the layer's float32 weights only (smoothing and int8 rounding
#: run in cache-sized blocks, quantize/sq_int8.py) and no modelopt import; the previous layer's int8
#: tensors, written while this one calibrates, are the plan's ``extracted`` (fitted: 8B-shaped,
#: 4 x 64 tokens, CPU: 1.50 GB peak RSS)
#: calibrations by forward hooks (plugin SmoothQuant, FP8, KV cache alone) import no modelopt
PLUGIN_HOST_BASE = HOST_BASE - 0.11 * GB  # measured: modelopt's import is 0.11 GB of RSS
#: ``--smoothquant auto``: per alpha tried, the five int8 linears and one dequantized to float32
#: (fitted: 8B-shaped, 4 x 64 tokens, CPU: 1.94 GB peak RSS)
PLUGIN_SEARCH_EXTRA = 0.55


@dataclass
class Stage:
    name: str
    host: float
    device: float
    disk: float


def _layer_linear_params(s) -> int:
    q = s.heads * s.head_size
    kv = s.kv_heads * s.head_size
    return s.hidden * (2 * q + 2 * kv) + 3 * s.hidden * s.inter


#: the whole-model path (from_pretrained in fp32): measured 0.58 GB + 6.0 bytes per parameter
#: (the float32 copy + the mapped fp16 source at the end of from_pretrained)
WHOLE_BASE, WHOLE_PER_PARAM = 0.58 * GB, 6.0


def plan(shape, spec, *, tp: int, pp: int, device: str, out_dtype_bytes: int = 2,
         layerwise: bool = True, checks: tuple = (), workers: int = 1,
         unified: bool = False) -> list[Stage]:
    """The stages of a conversion with ``spec`` (None or not quantized: the float converter).
    ``layerwise`` False: the calibration loads the whole model (formats without a layer-wise
    path). ``checks``: the verification runs asked for besides the quality gate that follows
    every calibration (``VERIFY_TOKENS``, ``EVAL_PPL_TOKENS``). ``workers``: rank files written
    at once, each by its own process with its own writer (``--workers``). ``unified``: the
    output is modelopt's unified checkpoint (``--target pytorch``)."""
    shape = _laid_out(shape)
    p_lin = _layer_linear_params(shape)
    recipe = spec.format if spec is not None else recipe_for(None)
    mem = memory_model(recipe, unified)
    ckpt_disk = checkpoint_disk(shape, mem, tp=tp, out_dtype_bytes=out_dtype_bytes,
                                scale=scale_disk(mem, spec, out_dtype_bytes),
                                quantized=_quantized_linears(recipe, spec, shape))
    stages = []
    calibrated = spec is not None and recipe.calibration(spec) is not None
    store_disk = 0.0
    if calibrated:
        c = 4 if device == "cpu" else 2
        n, seq, b = spec.calib_size, spec.calib_seq_len, spec.calib_batch_size
        search = PLUGIN_SEARCH_EXTRA if getattr(spec, "sq_alpha_search", False) else 0.0
        base = PLUGIN_HOST_BASE if mem.hooks else HOST_BASE  # used by the layer-wise stages only
        layer = p_lin * c * (mem.layer_factor + search)
        acts = n * seq * shape.hidden * c * (1 + mem.passes)
        if mem.search_inputs:  # AWQ's search holds every batch's linear inputs + one linear's outputs
            acts += n * seq * (3 * shape.hidden + 2 * shape.inter) * c
        temps = b * seq * (3 * shape.inter + 6 * shape.hidden) * c + b * shape.heads * seq * seq * c
        rows = min(shape.vocab, n * seq) * shape.hidden * c
        extracted = p_lin * (mem.weight_bytes or 0)
        work = layer + acts + temps + rows
        store_disk = store_disk_bytes(shape, spec, mem, c, ckpt_disk, scale_disk(mem, spec, c),
                                      recipe.calibration_input_sets(spec))
        if not layerwise:
            params = shape.layers * (p_lin + 2 * shape.hidden) + \
                shape.vocab * shape.hidden * (1 if shape.tied else 2)
            whole = WHOLE_BASE + WHOLE_PER_PARAM * params
            stages.append(Stage("calibration", whole if device == "cpu" else WHOLE_BASE,
                                0.0 if device == "cpu" else CUDA_CONTEXT + params * c, 0.0))
        elif device == "cpu":
            stages.append(Stage("calibration", base + work + extracted, 0.0, store_disk))
        else:  # the plugin recipe smooths the layer on the CPU in float32
            smoothing = p_lin * 4 * (mem.layer_factor + search) if mem.cpu_smoothing else 0.0
            stages.append(Stage("calibration", base + acts + rows + extracted + smoothing,
                                CUDA_CONTEXT + work, store_disk))
        write_host = WRITE_BASE + 2.5 * extracted  # a layer loaded, sharded, in the writer
        if unified:
            write_host = max(write_host, unified_writer_host(recipe, shape, p_lin))
    else:
        write_host = WRITE_BASE
    # the calibration stage's disk is its store (OUTPUT/calibration); the checkpoint's, its ranks
    writers = max(1, min(workers, tp * pp))
    stages.append(Stage("checkpoint", write_host * writers, 0.0, ckpt_disk))
    checks = (*checks, GATE_TOKENS) if spec is not None and recipe.gated(spec) else checks
    if checks:
        stages.append(verify_stage(shape, recipe.quant_algo, tp=tp, out_dtype_bytes=out_dtype_bytes, checks=checks))
    return stages


def _laid_out(shape):
    """``shape`` sized as the checkpoint lays the features out (hidden / MLP padding for
    TensorRT-LLM's weight-only / AWQ linears: quantize.apply.pad_features)."""
    return replace(shape, hidden=getattr(shape, "tp_hidden", shape.hidden),
                   inter=getattr(shape, "tp_inter", shape.inter))


def unified_writer_host(recipe, shape, p_lin: int) -> float:
    """--target pytorch's layer-by-layer unified writer (from the calibration store): the
    process base, float32 copies of a layer's linears and of the embedding table, as many as the
    recipe's fitted ``UnifiedFormat.writer_layers`` / ``writer_embedding``; 0 without them."""
    fmt = getattr(recipe, "unified", None)
    if fmt is None or fmt.writer_layers is None:
        return 0.0
    return (HOST_BASE + p_lin * 4 * fmt.writer_layers
            + shape.vocab * shape.hidden * 4 * fmt.writer_embedding)


#: what a run writes besides the tensors (build.json and the config files, ~5-10 KB; the Triton
#: repository's templates and configs, ~40 KB; the safetensors headers): measured on the golden
#: matrix (tests/test_disk_plan.py)
FIXED_DISK = 96 * 1024
#: a quantized format's scales (per channel, smoothers, activation and KV scales), per byte of its
#: quantized weights: fitted on the golden matrix (tests/test_disk_plan.py)
SCALE_DISK = 0.06
#: a group-wise format (AWQ): its per-group scales are counted exactly (``scale_disk``); this
#: covers the rest (the pre-quant scales, one per input feature of each linear, and the KV
#: scales), fitted on the golden matrix's AWQ cases
GROUP_SCALE_EXTRA = 0.03
#: a calibration store file's safetensors header (its tensors' names and offsets) and alignment
STORE_HEADER = 8 * 1024
#: bytes per weight of modelopt's unified checkpoint encodings (``UnifiedFormat.weight``)
UNIFIED_WEIGHT_BYTES = {"int8_rows": 1.0, "fp8": 1.0, "int4": 0.5}
#: a decoder layer's linears (spec names, as ``Recipe.quantizes_linear`` takes them) -> their
#: parameters, from (shape, q features, kv features)
LINEAR_PARAMS = {
    "attention.qkv": lambda s, q, kv: s.hidden * (q + 2 * kv),
    "attention.dense": lambda s, q, kv: s.hidden * q,
    "mlp.fc": lambda s, q, kv: s.hidden * s.inter * max(1, s.experts),
    "mlp.gate": lambda s, q, kv: s.hidden * s.inter * max(1, s.experts),
    "mlp.proj": lambda s, q, kv: s.hidden * s.inter * max(1, s.experts),
}


def memory_model(recipe, unified: bool):
    """The recipe's coefficients; for the unified checkpoint (``unified``) with its weights in
    modelopt's encoding, also where the engine checkpoint keeps them float (weight-only:
    trtllm-build quantizes them, the unified export writes int8 rows)."""
    mem = recipe.memory
    fmt = getattr(recipe, "unified", None) if unified else None
    if mem.weight_bytes is None and fmt is not None and fmt.weight in UNIFIED_WEIGHT_BYTES:
        return replace(mem, weight_bytes=UNIFIED_WEIGHT_BYTES[fmt.weight])
    return mem


def scale_disk(mem, spec, scale_bytes: int) -> float:
    """The scales' bytes per byte of quantized weights; group-wise: one ``scale_bytes`` scale per
    ``group_size`` weights, plus ``GROUP_SCALE_EXTRA``."""
    if mem.group_scales and mem.weight_bytes:
        return GROUP_SCALE_EXTRA + scale_bytes / (spec.group_size * mem.weight_bytes)
    return SCALE_DISK


def _quantized_linears(recipe, spec, shape):
    """(layer, linear) -> quantized, for a recipe that quantizes some linears of some layers
    from the weights alone (FP8 rowwise: the MLP; the meta recipe: not the first and last
    layers); None: every linear is (or none, for a float checkpoint)."""
    if spec is None or not recipe.from_weights:
        return None
    return lambda layer, linear: recipe.quantizes_linear(spec, layer, shape.layers, linear)


def checkpoint_disk(shape, mem, *, tp: int, out_dtype_bytes: int, scale: float = SCALE_DISK,
                    quantized=None) -> float:
    """The bytes of the checkpoint's files, all ranks (``shape`` as laid out: padded heads, the
    format's vocabulary multiple): KV heads duplicated up to tp, the experts and their float32
    routers, q/k/v biases, the norms, the vocabulary padded for tp. ``scale``: the scales per
    byte of quantized weights; ``quantized(layer, linear)``: whether that linear is quantized
    (None: every linear of every layer)."""
    s, hs = shape, shape.head_size
    if FAMILIES[s.family].shape_fields is not None:  # sizes of its own: count its spec's tensors
        return spec_bytes(s, tp, out_dtype_bytes) + FIXED_DISK
    q, kv = s.tp_heads * hs, max(s.tp_kv_heads, tp) * hs
    params = {name: f(s, q, kv) for name, f in LINEAR_PARAMS.items()}
    wbytes = out_dtype_bytes if mem.weight_bytes is None else mem.weight_bytes
    qbytes = wbytes * (1 + scale * (mem.weight_bytes is not None))
    if quantized is None:
        linears = sum(params.values()) * qbytes * s.layers
    else:
        linears = sum(p * (qbytes if quantized(i, name) else out_dtype_bytes)
                      for i in range(s.layers) for name, p in params.items())
    layer = s.experts * s.hidden * 4 + 2 * s.hidden * out_dtype_bytes
    layer += (q + 2 * kv) * out_dtype_bytes * s.attn_bias
    emb = padded_vocab(s.vocab, tp, s.vocab_multiple) * s.hidden * out_dtype_bytes
    return linears + layer * s.layers + emb * (1 if s.tied else 2) + \
        s.hidden * out_dtype_bytes + FIXED_DISK


def spec_bytes(shape, tp: int, out_dtype_bytes: int) -> float:
    """The bytes of every rank's float tensors, from the family spec's rules (each layer's own
    rules, ``Rule.when``; expert stacks; computed tensors at their own size; replicated tensors
    once per rank; float32 where a rule says so): for a family whose sizes the Llama formula
    above does not describe (``Family.shape_fields``: DeepSeek's MLA and narrow experts)."""
    family = FAMILIES[shape.family]
    total = 0.0

    def size(rule) -> float:
        if rule.shard in COMPUTED:
            n = math.prod(COMPUTED[rule.shard][0](shape, 1))
        else:
            n = sum(math.prod(DIMS[d](shape) for d in dims) for dims in rule.shapes)
        n *= shape.experts if rule.experts else 1
        n *= tp if rule.shard == REPLICATED else 1
        return n * (4 if rule.dtype == "float32" else out_dtype_bytes)

    for i in range(shape.layers):
        total += sum(size(r) for r in family.layer if applies(r.when, shape, i))
    emb = padded_vocab(shape.vocab, tp, shape.vocab_multiple) * shape.hidden * out_dtype_bytes
    return total + emb * 2 + shape.hidden * out_dtype_bytes * tp


def store_disk_bytes(shape, spec, mem, c: int, ckpt_disk: float, scale: float,
                     sets: int = 1) -> float:
    """The calibration store: every layer's quantized tensors and scales (``scale`` per byte of
    quantized weights, the calibration's ``c``-byte precision). While calibrating, the next
    layer's inputs are there too (``c`` bytes per activation; ``sets``: one per forward-loop pass
    when the passes differ, as with KV quantizers, else one shared): the last layer's beside every
    layer, and, with three layers or more, two sets at once beside every layer but the last (the
    new file is written before the old one goes). They are gone before the checkpoint
    (``ckpt_disk``) is written, so only what they exceed it by is counted."""
    layer = _layer_linear_params(shape) * (mem.weight_bytes or 0) * (1 + scale) + STORE_HEADER
    inputs = spec.calib_size * spec.calib_seq_len * shape.hidden * c * sets + STORE_HEADER
    extra = inputs - ckpt_disk
    if shape.layers >= 3:
        extra = max(extra, 2 * inputs - layer - ckpt_disk)
    return layer * shape.layers + max(0.0, extra)


#: (tokens whose hidden states are held at once, tokens whose logits are scored at once) of each
#: run of the reference reader against the float model (verify/): the quality gate (4 windows of
#: 256, scored one by one), --verify (the calibration text's first 2000 characters, or 2 x 32
#: random ids, as one batch), --eval-ppl (16 windows of 256 in batches of 4)
GATE_TOKENS, VERIFY_TOKENS, EVAL_PPL_TOKENS = (1024, 256), (1024, 1024), (4096, 1024)
HEAD_CHUNK_ROWS = 8192  # verify/model.py HEAD_CHUNK: lm_head rows made float32 at a time


def checks(verify: bool, eval_ppl) -> tuple:
    """The verification runs a build asked for besides the quality gate."""
    return (VERIFY_TOKENS,) * bool(verify) + (EVAL_PPL_TOKENS,) * bool(eval_ppl)


def verify_stage(shape, algo, *, tp: int, out_dtype_bytes: int, checks) -> Stage:
    """The verification stage (verify/): the float model, then the checkpoint, one decoder layer
    at a time over every window (a mixture-of-experts float model loads whole), then each batch's
    logits with the embedding / lm_head table as stored and float32 chunks of it."""
    held = max(c[0] for c in checks)
    scored = max(c[1] for c in checks)
    experts = max(1, shape.experts)
    mlp = 3 * shape.hidden * shape.inter * experts
    p_layer = _layer_linear_params(shape) - 3 * shape.hidden * shape.inter + mlp
    largest = shape.hidden * max(shape.inter, (shape.heads + 2 * shape.kv_heads) * shape.head_size)
    # the float layer in float32 (+ the tensor being cast); the checkpoint's layer as stored
    # (+ its largest linear dequantized to float32 by the kernel)
    float_layer = p_layer * 4 + largest * 2
    if shape.experts:
        params = shape.layers * (p_layer + 2 * shape.hidden) + \
            shape.vocab * shape.hidden * (1 if shape.tied else 2)
        if FAMILIES[shape.family].shape_fields is not None:  # its spec's own sizes
            params = spec_bytes(shape, 1, 1)
        float_layer = WHOLE_BASE + WHOLE_PER_PARAM * params - HOST_BASE
    weight_bytes = recipe_for(algo).memory.weight_bytes
    ckpt_layer = p_layer * (out_dtype_bytes if weight_bytes is None else weight_bytes) + largest * 4
    acts = held * shape.hidden * 4 * (2 + tp)  # a layer's inputs and outputs (the reader: per tp rank)
    temps = GATE_TOKENS[1] * (3 * shape.inter + 6 * shape.hidden) * 4 + \
        shape.heads * GATE_TOKENS[1] ** 2 * 4 * 2
    logits = scored * shape.vocab * (4 + 8 + 8)  # float32 logits, float64 copy, log-softmax
    table = shape.vocab * shape.hidden * out_dtype_bytes + HEAD_CHUNK_ROWS * shape.hidden * 6
    host = HOST_BASE + acts + max(max(float_layer, ckpt_layer) + temps, logits + table)
    return Stage("verification", host, 0.0, 0.0)


def host_limit() -> tuple[float, str]:
    """(bytes of host RAM a build may use, where that figure comes from)."""
    env = os.environ.get("BUILD_ENGINE_MEMORY_LIMIT")
    if env:
        return _parse_bytes(env), "BUILD_ENGINE_MEMORY_LIMIT"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + _own_rss(), "available RAM"
    except OSError:
        pass
    return float("inf"), "unknown"


def _own_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _parse_bytes(text: str) -> float:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        return float(t[:-1] if t[-1:] in "KMGT" else t) * mult
    except ValueError:
        raise UserError(f"BUILD_ENGINE_MEMORY_LIMIT={text!r} is not a size; give bytes or e.g. 8G")


def device_limit(device: str) -> float:
    if device != "cuda":
        return float("inf")
    import torch

    return float(torch.cuda.mem_get_info()[0])


def disk_free(out: Path) -> float:
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return float(shutil.disk_usage(p).free)


def describe(stages: list[Stage]) -> str:
    """The plan in one line; the disk figure rounded up (it must never read less than is written)."""
    return "; ".join(f"{s.name}: host {s.host / GB:.2f} GB, device {s.device / GB:.2f} GB, "
                     f"disk {math.ceil(round(s.disk / GB * 100, 6)) / 100:.2f} GB" for s in stages)


def check(stages: list[Stage], out: Path, device: str) -> None:
    """Refuse (one line) a plan this machine cannot hold."""
    host, source = host_limit()
    dev = device_limit(device)
    disk = disk_free(out)
    for s in stages:
        if s.host > host:
            fix = "drop --verify/--eval-ppl" if s.name == "verification" else \
                "lower --calib-size/--calib-seq-len, calibrate with --calib-device cuda"
            raise UserError(f"memory plan: the {s.name} stage needs ~{s.host / GB:.2f} GB of host "
                            f"RAM but {host / GB:.2f} GB is available ({source}); {fix}, "
                            f"or use a machine with more memory")
        if s.device > dev:
            raise UserError(f"memory plan: the {s.name} stage needs ~{s.device / GB:.2f} GB of GPU "
                            f"memory but {dev / GB:.2f} GB is free; lower --calib-size/"
                            f"--calib-seq-len or use --calib-device cpu")
    total_disk = sum(s.disk for s in stages)
    if total_disk > disk:
        raise UserError(f"memory plan: the output needs ~{total_disk / GB:.2f} GB of disk but "
                        f"{disk / GB:.2f} GB is free under {out}; free space or choose another "
                        f"--output")
