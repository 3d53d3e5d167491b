"""What TensorRT-LLM 1.x would do with a checkpoint, decided on CPU from its config.json and the
safetensors headers alone (``build_engine check DIR``).

TensorRT-LLM loads a checkpoint rank by rank (``tensorrt_llm/models/modeling_utils.py``,
``PretrainedModel.from_checkpoint``): ``PretrainedConfig.from_json_file`` → the rank's tensors →
``preprocess_weights`` (int4 packing, scale transposes, KV reciprocal scales, weight-only
quantization) → ``cls(config)``, whose ``__post_init__`` runs ``quantization/quantize.py``'s
``quantize()`` (the quantized layer classes of ``quantization/layers.py`` replace the float ones)
→ ``load()``, which raises on a missing tensor, warns on an extra one, and asserts every
parameter's shape (``Parameter.value``). This package restates that chain as data plus a small
interpreter, next to the family specs it takes its names from:

- ``check/formats.py``: per ``quant_algo``, the parameters each quantized layer class declares and
  the transforms ``preprocess_weights`` applies (the table; upstream file + function per row);
- ``check/model_classes.py``: per TensorRT-LLM model class (architecture), the family spec, the
  bias flags and the config fields the class needs;
- ``check/declared.py``: the interpreter: config.json → every rank's declared parameters;
- ``check/preprocess.py``: a rank's header (name → shape, dtype) → what ``preprocess_weights``
  hands to ``load()``;
- ``check/inspect.py``: what a directory is, and its headers;
- ``check/report.py``: the comparison, its findings in TensorRT-LLM's words, the exit status;
- ``check/gpu.py``: GPU names → SM, and what TensorRT-LLM 1.2's build refuses per generation.

It imports ``model/`` and ``common/`` only (never torch): the check reads headers, never tensor data.
"""
from __future__ import annotations

from .report import CheckResult, check_checkpoint, check_dir  # noqa: F401
