"""Triton model repositories for the engines (``DIR/triton``), and their validation.

Modules: ``options`` (the --triton-* flags), ``model_config`` (Triton's ModelConfig schema, text
format), ``engine_config`` (what is read from the engine config), ``inflight_batcher`` (engine
target layout), ``llmapi`` + ``llmapi_schema`` (PyTorch target layout, model.yaml keys),
``launch`` (launch_triton.sh), ``repo_files`` (paths, tokenizer, atomic write), ``validate``.

Two targets
-----------
``write_engine_repo`` — TensorRT engines (TensorRT-LLM <= 1.2.x) served by Triton's C++
``tensorrtllm`` backend, laid out as triton-inference-server/tensorrtllm_backend's
``all_models/inflight_batcher_llm`` (later NVIDIA/TensorRT-LLM ``triton_backend/all_models/
inflight_batcher_llm``)::

    triton/
      ensemble/            config.pbtxt, 1/          preprocessing → tensorrt_llm → postprocessing
      preprocessing/       config.pbtxt, 1/model.py  (Python backend: text → token ids, our own)
      tensorrt_llm/        config.pbtxt, 1/          (backend "tensorrtllm", gpt_model_path)
      postprocessing/      config.pbtxt, 1/model.py  (Python backend: token ids → text, our own)
      tensorrt_llm_bls/    config.pbtxt, 1/model.py  (only with --triton-bls; our own BLS model)
      launch_triton.sh     the tritonserver command line (mpirun, one process per rank; or
                           "slurm": srun --mpi=pmix, one task per rank)
      triton_repo.json     what was written, for people and tools (Triton ignores plain files)

Every ``config.pbtxt`` is *filled*: there is no ``${...}`` left. Instead of copying NVIDIA's
templates and running ``tools/fill_template.py`` over them, each config is built here as a Triton
``ModelConfig`` protobuf message (the schema shipped in ``tritonclient``) and printed with
protobuf's text format, so a typo in a field name or an enum value fails at build time.
Tensor names, data types and shapes are those of the 1.2-era templates; only the inputs a
text-only decoder model can use are wired into the ensemble (no multimodal, encoder-decoder,
p-tuning or LoRA tensors), and the ``tensorrt_llm`` model declares the backend's other optional
inputs too, so a client may still send them to it directly.

``write_llmapi_repo`` — current TensorRT-LLM (PyTorch backend, no engines) served by the LLM-API
Python model, laid out as NVIDIA/TensorRT-LLM ``triton_backend/all_models/llmapi``::

    triton/
      tensorrt_llm/        config.pbtxt, 1/model.yaml (LLM args + triton_config), 1/model.py
      launch_triton.sh, triton_repo.json

Values that come from the engine
--------------------------------
``engine_config`` is the engine's ``config.json`` as trtllm-build writes it (``pretrained_config``
+ ``build_config``). The repository is usually written *before* the engines exist (they are built
later, on a GPU host), so :func:`engine_config_from_checkpoint` produces the same shape from the
checkpoint's ``config.json`` and the engine build options (``--max-batch-size`` ...), which is
what trtllm-build will put there. A bare checkpoint config is accepted too (build defaults).
Used from it: ``mapping`` (world size → ``mpirun -n``), ``logits_dtype`` (the data type of the
logits outputs, float32 or float16: the C++ backend checks it equals the engine's and serves no
other), ``vocab_size`` (checked against
the tokenizer), ``max_batch_size`` (cap of the Triton batch size), ``max_beam_width``,
``max_input_len`` (checked by the preprocessing model; deduced and clipped to max_seq_len as
trtllm-build does), ``plugin_config`` (in-flight batching
needs the paged KV cache, packed inputs and the attention plugin).

Paths
-----
Paths in ``config.pbtxt`` / ``model.yaml`` are absolute by default: the C++ backend opens
``gpt_model_path`` relative to tritonserver's working directory, so a relative path would depend
on where the server is started. For serving from another host or a container, pass
``--triton-model-root ROOT``: the directory at which the *build output directory* (the parent of
this repository, holding ``engines/`` and ``triton/``) will be mounted. Every path inside it is
then written as ``ROOT/<relative path>`` (e.g. ``/models/engines``) and the launch script serves
``ROOT/triton``. Paths outside it (a tokenizer in the HF model dir, the HF model a float
``--target pytorch`` repository serves) are written unchanged and listed under ``external_paths``
in ``triton_repo.json``, with or without ``--triton-model-root``: a copy of the output directory
alone lacks them. ``--triton-copy-tokenizer`` copies the tokenizer files into the repository
instead (``preprocessing/1/tokenizer``), making it self-contained.

Writes go to a temporary directory beside ``out_dir``, are validated with :func:`validate_repo`,
then renamed into place (an existing ``out_dir`` is replaced only with ``--force``).
"""
from __future__ import annotations

from builders.triton.engine_config import engine_config_from_checkpoint
from builders.triton.inflight_batcher import engine_model_configs, write_engine_repo
from builders.triton.launch import TRITONSERVER, launch_command
from builders.triton.llmapi import (llmapi_model_config, llmapi_model_yaml, trtllm_serve_command,
                                    write_llmapi_repo)
from builders.triton.llmapi_schema import LLMAPI_MODEL_YAML_KEYS, check_llmapi_model_yaml
from builders.triton.model_config import model_config_pb2, parse_config
from builders.triton.options import (BATCHING_STRATEGIES, SCHEDULER_POLICIES, TARGETS,
                                     TritonOptions, add_triton_arguments)
from builders.triton.repo_files import (BLS, ENSEMBLE, LAUNCH_SCRIPT, POSTPROCESSING,
                                        PREPROCESSING, REPO_INFO, TENSORRT_LLM, check_tokenizer)
from builders.triton.validate import validate_repo

__all__ = [
    "BATCHING_STRATEGIES", "BLS", "ENSEMBLE", "LAUNCH_SCRIPT", "LLMAPI_MODEL_YAML_KEYS",
    "POSTPROCESSING", "PREPROCESSING", "REPO_INFO", "SCHEDULER_POLICIES", "TARGETS",
    "TENSORRT_LLM", "TRITONSERVER", "TritonOptions", "add_triton_arguments",
    "check_llmapi_model_yaml", "check_tokenizer", "engine_config_from_checkpoint",
    "engine_model_configs", "launch_command", "llmapi_model_config", "llmapi_model_yaml",
    "model_config_pb2", "parse_config", "trtllm_serve_command", "validate_repo",
    "write_engine_repo", "write_llmapi_repo",
]
