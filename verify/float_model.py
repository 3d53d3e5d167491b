"""The float Hugging Face model's logits, the side every comparison measures against.

A directory is run one decoder layer at a time straight from its safetensors, with calibration's
own machinery (``quantize.layerwise.LayerRunner``: the model's skeleton on the meta device, the
inputs each layer gets inside the whole model, one layer materialised at a time), then the final
norm and lm_head (``HEAD_CHUNK`` rows at a time): the logits equal ``from_pretrained(dtype=float32)``'s
bit for bit, and the peak is one float32 layer plus the batches' activations, whatever the depth.
A loaded model (tests) and mixture-of-experts models (their safetensors hold per-expert tensors
that transformers fuses when it loads the whole model) run whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from common.errors import UserError

from common.heap import release_memory
from quantize.torch_io import read_tensor

from .model import HEAD_CHUNK

Tensor = torch.Tensor


def load_hf(hf_model_or_dir):
    """A loaded HF causal LM as given, or a directory's loaded whole in float32."""
    if not isinstance(hf_model_or_dir, (str, Path)):
        return hf_model_or_dir
    d = _hf_dir(hf_model_or_dir)
    from transformers import AutoModelForCausalLM

    from convert.block_fp8 import block_size

    if block_size(_config(d)) is not None:
        return _dequantized_hf(d)
    try:
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the Hugging Face model from {d}: {' '.join(str(e).split())[:300]}") from None


def _dequantized_hf(d: Path):
    """A block-scaled fp8 directory (DeepSeek-V3's release format) as the float model it
    encodes, in float32: transformers' fp8 loading needs a GPU, so the weights, read dequantized
    (convert/block_fp8.py), are saved with the config less its ``quantization_config`` in a
    temporary directory that transformers loads (its Hub-layout conversions apply)."""
    import json
    import tempfile

    from safetensors.torch import save_file

    from convert.block_fp8 import open_source
    from convert.source_files import declared_dtype
    from quantize.torch_io import read_tensor

    config = dict(_config(d))
    config.pop("quantization_config")
    source = open_source(d, _config(d), declared_dtype(_config(d)))
    with tempfile.TemporaryDirectory(prefix="dequantized-") as tmp:
        try:
            save_file({n: read_tensor(source, n) for n in source.meta},
                      str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        finally:
            source.close()
        (Path(tmp) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return load_hf(Path(tmp))


def _hf_dir(path) -> Path:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"Hugging Face directory {d} has no config.json")
    return d


def _config(d: Path) -> dict:
    from model.config import config_dict

    try:
        c = config_dict(d)  # the run's one parse of config.json
    except (OSError, ValueError) as e:
        raise UserError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    return c if isinstance(c, dict) else {}


def hf_vocab_size(hf_model_or_dir) -> int | None:
    if isinstance(hf_model_or_dir, (str, Path)):
        v = _config(_hf_dir(hf_model_or_dir)).get("vocab_size")
    else:
        v = getattr(hf_model_or_dir.config, "vocab_size", None)
    return None if v is None else int(v)


def runs_layerwise(hf_model_or_dir) -> bool:
    """A directory of a dense model whose family quantize.layerwise can run (``Family.layerwise``):
    run layer by layer (else whole)."""
    from model.families import ARCHITECTURES, FAMILIES

    if not isinstance(hf_model_or_dir, (str, Path)):
        return False
    c = _config(_hf_dir(hf_model_or_dir))
    family = FAMILIES.get(ARCHITECTURES.get((c.get("architectures") or [None])[0]))
    if family is not None and not family.layerwise:
        return False
    return not any(c.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


@torch.no_grad()
def float_logits(hf_model_or_dir, batches: Sequence[Tensor]) -> Iterator[Tensor]:
    """float32 logits of the float model for each batch of ``batches``, one batch at a time."""
    if runs_layerwise(hf_model_or_dir):
        yield from _layerwise_logits(_hf_dir(hf_model_or_dir), batches)
        return
    model = load_hf(hf_model_or_dir)
    for b in batches:
        yield model(input_ids=b).logits.float()


def _layerwise_logits(d: Path, batches: Sequence[Tensor]) -> Iterator[Tensor]:
    from convert.source import SourceCheckpoint
    from quantize.layerwise import LayerRunner, materialise, meta_model

    source = SourceCheckpoint(d)
    try:
        cpu = torch.device("cpu")
        runner = LayerRunner(d, source, list(batches), cpu, modelopt=False)
        hs = runner.first_inputs
        for i in range(len(runner)):
            layer = runner.materialise(i)
            hs = runner.forward(layer, i, hs)
            del layer
            release_memory()
        model = meta_model(d, runner.dtype)
        base = runner.layers_name.rpartition(".")[0]
        norm = materialise(model.get_submodule(f"{base}.norm"), source, f"{base}.norm", cpu, runner.dtype)
        head = _head_weight(model, source, d)
        for k in range(len(hs)):
            h, hs[k] = hs[k], None
            yield _chunked_head(norm(h), source, head, runner.dtype).float()
    finally:
        source.close()


def _head_weight(model, source, d: Path) -> str:
    """The safetensors name of lm_head's weight (the embedding's when the model ties them)."""
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    if f"{name}.weight" in source:
        return f"{name}.weight"
    if getattr(model.config, "tie_word_embeddings", False):
        emb = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        if f"{emb}.weight" in source:
            return f"{emb}.weight"
    raise UserError(f"the safetensors in {d} have no {name}.weight")


def _chunked_head(x: Tensor, source, name: str, dtype: torch.dtype) -> Tensor:
    rows = source.shape(name)[0]
    return torch.cat([F.linear(x, read_tensor(source, name, (slice(a, a + HEAD_CHUNK),)).to(dtype))
                      for a in range(0, rows, HEAD_CHUNK)], dim=-1)
