#!/usr/bin/env bash
# Prepare the `--baseline onnx` model with Hugging Face optimum's exporter (what an ONNX
# user would pick instead of edgekv): SmolLM2-135M, fp32, text-generation-with-past.
# optimum-onnx pins transformers < 4.58, so it gets its own environment (bench/.optimum-venv,
# torch pinned to the local CPU wheel); it exports edgekv's cached HF conversion of the GGUF.
#
#   bash bench/export_optimum_baseline.sh [OUT_DIR]      (default bench/optimum-baseline)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/optimum-baseline}
VENV=bench/.optimum-venv
if [ ! -x "$VENV/bin/optimum-cli" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q "optimum-onnx[onnxruntime]"
fi
# The HF directory edgekv converted the GGUF into (converting it first if needed).
hf_dir=$(.venv/bin/python -c "
from edgekv.export.model_loading import converted_cache_dir, load_model, resolve_model_path
d = converted_cache_dir(resolve_model_path('default'))
if not (d / 'config.json').exists():
    load_model('default')
print(d)")
"$VENV/bin/optimum-cli" export onnx --model "$hf_dir" --task text-generation-with-past "$OUT"
echo "optimum export of $hf_dir -> $OUT"
