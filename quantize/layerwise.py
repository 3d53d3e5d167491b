"""Calibration one decoder layer at a time, straight from the safetensors.

Peak memory is one layer's weights plus the calibration activations, whatever the depth. The
result is modelopt's whole-model ``mtq.quantize`` bit for bit (tests/test_quantize_convert.py),
because each layer sees exactly what it sees inside the whole model
(docs/layerwise-calibration.md):

* the layer inputs the model builds (embedding, rotary ``position_embeddings``, the mask and
  every other keyword) are caught by running the model's own forward with the decoder layers
  replaced by recorders: a model skeleton on the meta device, only the embedding rows the
  calibration ids use and the rotary embedding made real;
* each layer is ``mtq.quantize``d alone, with the same config, on the cached inputs; the next
  layer's inputs are this layer's outputs during that calibration forward (quantizers
  collecting), not a float forward afterwards (SmoothQuant/AWQ smooth the weights in place);
  TensorRT-LLM's plugin SmoothQuant recipe instead records its ranges with forward hooks on the
  layer's linears during that forward and smooths/quantizes the layer (quantize/sq_layerwise.py),
  and modelopt's ``max`` formats (FP8, a KV cache alone) record the same running maxima as its
  quantizers with forward hooks (quantize/max_layerwise.py), without modelopt;
* multi-pass algorithms (awq_lite: a cache pass, then a search pass with the KV quantizers
  switched on between them) replay pass-synchronously: layer i's k-th forward-loop call gets the
  outputs layer i-1 produced in ITS k-th call; awq_lite's search pass itself runs with each
  alpha's quantized weight made once per linear (quantize/awq_search.py).

Each finished layer's quantized tensors (what :func:`quantize.modelopt_state.extract_quant_state`
returns for it, unsharded) go to ``store/layer_NNNNN.safetensors`` with the next layer's inputs
(``store/inputs.safetensors``), so an interrupted calibration resumes from the last finished layer
and the store can be re-sharded for any tp/pp (quantize/store.py).

The weights come through ``source``: anything with ``read(name, index=())`` and ``name in
source`` (the converter passes its ``SourceCheckpoint``), so this module needs no converter code.
"""
from __future__ import annotations

import copy
import gc
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common.errors import UserError
from common.fileio import reusing_buffers
from common.heap import release_memory

from .calibrate import bos_if_added, make_calib_batches, tokenize_text
from .modelopt_state import extract_quant_state, model_family
from .formats import QuantSpec
from .recipes import MAX, SQ_HOOKS
from .torch_io import read_tensor
from .unified.store_entries import smoothing_recorder, store_entries
from . import store as cstore

Tensor = torch.Tensor


class _Stop(Exception):
    """Raised by the last recorder: the model's forward needs to go no further."""


class _RowEmbedding(torch.nn.Module):
    """The rows of an embedding table that ``ids`` use, looked up as the full table would be;
    ``scale``: what a scaled embedding (HF's ``*ScaledWordEmbedding``, ``scalar_embed_scale``:
    Gemma 3) multiplies its output by, a float32 constant cast to the table's dtype as it does."""

    def __init__(self, uniq: Tensor, rows: Tensor, scale: float | None = None):
        super().__init__()
        self.register_buffer("uniq", uniq, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.scale = scale

    def forward(self, ids: Tensor) -> Tensor:
        out = self.rows[torch.searchsorted(self.uniq, ids)]
        return out if self.scale is None else out * torch.tensor(self.scale).to(out.dtype)


def compute_dtype(device: torch.device, hf_dtype) -> torch.dtype:
    """What the whole-model path loads in: float32 on CPU, the model's fp16/bf16 on a GPU."""
    if device.type == "cpu":
        return torch.float32
    return hf_dtype if hf_dtype in (torch.float16, torch.bfloat16) else torch.float16


def meta_model(hf_dir: Path, dtype: torch.dtype, pad=None):
    """The model's skeleton on the meta device (config, module classes, attention choice); with
    its hidden size padded by ``pad`` (quantize.calib_padding.CalibPad)."""
    from transformers import AutoModelForCausalLM

    from model.config import pretrained_config

    try:
        config = pretrained_config(hf_dir)  # the run's one parse of config.json
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config in {hf_dir} for calibration: {e}") from None
    if pad is not None:
        pad.config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _layers_path(model) -> tuple[str, torch.nn.ModuleList]:
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList):
            return name, mod
    raise UserError("no decoder layers (a '*.layers' module list) found: not a Llama-family model")


def calib_batches(spec: QuantSpec, text: str, tokenizer) -> list[Tensor]:
    """The calibration batches exactly as :func:`quantize.calibrate.calibrate` cuts them."""
    if not text.strip():
        raise UserError("the calibration text is empty")
    ids = tokenize_text(text, tokenizer)
    bos = bos_if_added(tokenizer)
    return make_calib_batches(ids, spec.calib_size, spec.calib_seq_len, spec.calib_batch_size, bos)


@torch.no_grad()
def layer_inputs(model, source, batches: list[Tensor], device: torch.device, dtype: torch.dtype,
                 pad=None):
    """(embedding outputs per batch, per layer per batch the keyword arguments the model passes).

    Runs the model's own forward with every decoder layer replaced by a recorder; only the used
    embedding rows and the rotary embedding are real.
    """
    emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    weight = f"{emb_name}.weight"
    if weight not in source:
        raise UserError(f"the model's safetensors have no {weight}")
    vocab = model.get_input_embeddings().num_embeddings
    uniq = torch.unique(torch.cat([b.reshape(-1) for b in batches]))
    if int(uniq.max()) >= vocab:
        raise UserError(f"the tokenizer produced id {int(uniq.max())} but the model's vocab_size is "
                        f"{vocab}; the tokenizer does not belong to this model")
    rows = torch.stack([read_tensor(source, weight, (slice(int(i), int(i) + 1),))[0] for i in uniq])
    if pad is not None:
        rows = pad.tensor(weight, rows, (len(uniq), model.get_input_embeddings().embedding_dim))
    parent, _, leaf = emb_name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    scale = getattr(model.get_input_embeddings(), "scalar_embed_scale", None)
    setattr(owner, leaf, _RowEmbedding(uniq.to(device), rows.to(device=device, dtype=dtype), scale))
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            p, _, leaf = name.rpartition(".")
            real = type(mod)(config=mod.config).to(device)
            setattr(model.get_submodule(p) if p else model, leaf, real)
    _, layers = _layers_path(model)
    firsts: list[Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def recorder(i):
        def forward(hidden_states, *args, **kw):
            if args:
                raise UserError("the model passes decoder layers positional arguments; "
                                "layer-wise calibration does not know this architecture")
            if i == 0:
                firsts.append(hidden_states)
            kwargs[i].append(kw)
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # the instance keeps its attributes (attention_type, ...)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return firsts, kwargs


def materialise(layer_meta, source, prefix: str, device: torch.device, dtype: torch.dtype,
                pad=None):
    """A real copy of one decoder layer with its weights from ``source`` (cast as from_pretrained;
    padded to the meta layer's shapes by ``pad``)."""
    layer = copy.deepcopy(layer_meta)  # on meta: the weights below are assigned, never copied
    if any(True for _ in layer.buffers()):
        raise UserError(f"{prefix} has buffers; layer-wise calibration does not know this layer type")
    state = {}
    for name, p in layer_meta.named_parameters():
        key = f"{prefix}.{name}"
        if key not in source:
            raise UserError(f"the model's safetensors have no {key}")
        t = read_tensor(source, key)
        state[name] = (t if pad is None else pad.tensor(name, t, p.shape)).to(device=device, dtype=p.dtype)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def _shell(layers_name: str, index: int, layer, family=None) -> torch.nn.Module:
    """A container giving ``layer`` its whole-model name (``model.layers.5``), so that modelopt's
    wildcards and extract_quant_state's names match the whole model's, and its family spec
    (``family_spec``: which HF modules are its linears, quantize.modelopt_state.model_family)."""
    root = torch.nn.Module()
    root.family_spec = family
    node = root
    parts = layers_name.split(".")
    for part in parts[:-1]:
        child = torch.nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], torch.nn.ModuleDict({str(index): layer}))
    return root


def _calibrate_layer(shell, runner: LayerRunner, i: int, spec: QuantSpec,
                     passes_in: list[list[Tensor]]) -> list[list[Tensor]]:
    """mtq.quantize layer ``i`` (inside ``shell``) on its cached inputs; its outputs per
    forward-loop call (pass k gets the previous layer's pass-k outputs)."""
    import modelopt.torch.quantization as mtq

    produced: list[list[Tensor]] = []
    path = runner.prefix(i)

    def loop(root):
        ins = passes_in[min(len(produced), len(passes_in) - 1)]
        layer = root.get_submodule(path)
        if _awq_searching(layer):  # each alpha's quantized weight once, not once per batch
            from .awq_search import search_pass

            produced.append(search_pass(runner, layer, i, ins))
        else:
            produced.append(runner.forward(layer, i, ins))

    mtq.quantize(shell, spec.modelopt_config(), loop)
    # passes that gave the same outputs share one buffer (no KV quantizers: all of them)
    for k in range(len(produced) - 1, 0, -1):
        if all(torch.equal(a, b) for a, b in zip(produced[k], produced[k - 1])):
            produced[k] = produced[k - 1]
    return produced


def _awq_searching(layer) -> bool:
    """True in awq_lite's search pass (its helper class's ``cache_mode`` is off after the cache
    pass)."""
    helper = next((m.awq_lite for m in layer.modules() if hasattr(m, "awq_lite")), None)
    return helper is not None and not type(helper).cache_mode


def _register_attentions(model) -> None:
    """modelopt registers HF attention classes for KV-cache quantization only when it quantizes a
    whole PreTrainedModel; a lone layer needs them registered from the skeleton first."""
    from modelopt.torch.quantization.plugins.huggingface import register_hf_attentions_on_the_fly

    register_hf_attentions_on_the_fly(model)


class LayerRunner:
    """The model's decoder layers one at a time, fed exactly as inside the whole model: the seam
    for any per-layer calibration (modelopt here; the plugin SmoothQuant's range hooks in
    quantize/sq_layerwise.py: hook ``materialise(i)``'s linears, run :meth:`forward`, pass its
    outputs on)."""

    def __init__(self, hf_dir, source, batches: list[Tensor], device: torch.device, *,
                 modelopt: bool = True, pad=None):
        self.source, self.device, self.pad = source, device, pad
        self.dtype = compute_dtype(device, config_dtype(Path(hf_dir)))
        model = meta_model(Path(hf_dir), self.dtype, pad)
        self.config = model.config
        self.family = model_family(model)  # the spec of its linears (Phi-3's fused modules)
        if modelopt:  # not for range hooks (plugin SmoothQuant) nor a float run (verify/): its import is ~5 s
            _register_attentions(model)
        #: the first layer's inputs per batch; per layer per batch the model's keyword arguments
        self.first_inputs, self.kwargs = layer_inputs(model, source, batches, device, self.dtype, pad)
        self.layers_name, self.layers = _layers_path(model)

    def __len__(self) -> int:
        return len(self.layers)

    def prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}"

    def materialise(self, i: int):
        """Layer ``i`` with its weights, in the compute dtype on the device."""
        return materialise(self.layers[i], self.source, self.prefix(i), self.device, self.dtype,
                           self.pad)

    def named(self, i: int, layer) -> torch.nn.Module:
        """``layer`` (layer ``i``) in a shell giving it its whole-model name (``model.layers.5``)."""
        return _shell(self.layers_name, i, layer, self.family)

    @torch.no_grad()
    def forward(self, layer, i: int, inputs: list[Tensor]) -> list[Tensor]:
        """``layer``'s outputs on ``inputs`` (one per batch), called as the model calls it."""
        outs = []
        for h, kw in zip(inputs, self.kwargs[i]):
            o = layer(h, **kw)
            outs.append(o[0] if isinstance(o, tuple) else o)
        return outs


def _modelopt_layer(runner: LayerRunner, i: int, spec: QuantSpec,
                    passes_in: list[list[Tensor]]) -> tuple[dict, list[list[Tensor]]]:
    """Layer ``i`` calibrated with modelopt: its extracted tensors and its outputs per pass."""
    shell = runner.named(i, runner.materialise(i))
    with smoothing_recorder(spec) as smoothing:
        passes_out = _calibrate_layer(shell, runner, i, spec, passes_in)
    # prequant scales kept in the calibration's precision; cast when sharded (store.py); and
    # what the unified checkpoint (--target pytorch) needs beside them
    state = extract_quant_state(shell, spec, dtype=runner.dtype)
    if runner.pad is not None:
        state = runner.pad.neutral_smoothing(state)
    state.update(store_entries(shell, runner.prefix(i), spec, smoothing))
    return state, passes_out


def layer_calibrator(method: str | None):
    """The function that calibrates one layer by the recipe's calibration ``method``
    (quantize/recipes/base.py): TensorRT-LLM's SmoothQuant by range hooks, smoothing and int8 per
    layer; modelopt's running maxima by forward hooks (FP8, KV caches); else modelopt itself."""
    if method == SQ_HOOKS:
        from .sq_layerwise import calibrate_plugin_layer
        return calibrate_plugin_layer
    if method == MAX:
        from .max_layerwise import calibrate_max_layer
        return calibrate_max_layer
    return _modelopt_layer


def calibrate_layerwise(hf_dir, source, spec: QuantSpec, store: Path, batches: list[Tensor], *,
                        device: torch.device, fingerprint: dict, progress: bool = True,
                        timings: dict | None = None, model: str | None = None, pad=None) -> dict:
    """Calibrate every decoder layer on ``batches`` (:func:`calib_batches`) into ``store``,
    resuming a store of the same ``fingerprint``; return the store's manifest (quantize/store.py).
    ``pad``: the hidden size padded for the calibration (quantize.calib_padding).
    ``timings`` receives the seconds of the input capture (``calibration_inputs``) and of the
    layers (``calibration_layers``)."""
    from tqdm.auto import tqdm

    store = Path(store)
    done = cstore.begin(store, fingerprint, model)
    if done.get("complete"):
        return done
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    calibrate_one = layer_calibrator(spec.format.calibration(spec))
    uses_modelopt = calibrate_one is _modelopt_layer
    runner = LayerRunner(hf_dir, source, batches, device, modelopt=uses_modelopt, pad=pad)
    n = len(runner)
    start = done.get("layers_done", 0)
    passes_in = [runner.first_inputs] if start == 0 else cstore.load_inputs(store, device)
    t1 = time.perf_counter()
    timings["calibration_inputs"] = t1 - t0
    bar = tqdm(total=n, initial=start, desc=f"calibrating {spec.name}", unit="layer",
               disable=not progress, file=sys.stderr)
    # a layer's store files are written on a thread while the next layer calibrates (at 8B shapes
    # ~0.2 s per layer, O_DIRECT); one write in flight, in layer order, so the store's manifest
    # still records only layers whose files are complete
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibration-store") as pool, \
            reusing_buffers():  # the store's O_DIRECT buffers, once for every layer
        written = None
        for i in range(start, n):
            state, passes_in = calibrate_one(runner, i, spec, passes_in)
            if uses_modelopt:  # hooks of our own leave no cycles; a full collection costs ~2 s
                gc.collect()  # modelopt's hooks make reference cycles: free the layer first
            if written is not None:
                written.result()  # re-raises the previous write's error
                bar.update(1)
            written = pool.submit(cstore.finish_layer, store, i, state,
                                  passes_in if i + 1 < n else None)
            del state
            release_memory()
        if written is not None:
            written.result()
            bar.update(1)
    bar.close()
    timings["calibration_layers"] = time.perf_counter() - t1
    return cstore.complete(store, n, seconds=time.perf_counter() - t0)


def config_dtype(hf_dir: Path):
    from model.config import config_dict

    try:
        cfg = config_dict(hf_dir)  # the run's one parse of config.json
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None
