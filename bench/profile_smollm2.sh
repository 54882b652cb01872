#!/usr/bin/env bash
# BENCHMARKS.md speed table: SmolLM2-135M exported at 16/8/4/3/2 bits (calibrated, the GGUF's
# own weight blocks: the export defaults; window 1024 + 4 sinks,
# block 32: contexts beyond ~1,060 tokens stream through eviction), profiled at each prompt
# length against baselines measured in the same run: transformers fp32 (DynamicCache, and
# QuantizedCache where optimum-quanto is installed) and a standard past-key-values ONNX
# export on onnxruntime, made by optimum's exporter (bench/export_optimum_baseline.sh).
# Writes bench/results/profile-smollm2.{json,csv}, docs/img/profile-smollm2.png and prints
# the markdown rows. Slow: run it on a quiet machine.
#
#   BITS="16 8 4 3 2" LENS=1024,4096,8192 GEN=128 REPEAT=1 bash bench/profile_smollm2.sh
#   ONNX=torch uses our own torch.onnx past-kv export instead (bench/export_onnx_baseline.py,
#   no second environment); ONNX=0 skips the ONNX baseline; LLAMACPP=1 installs llama-cpp-python (builds llama.cpp
#   from source, 10+ minutes on 2 cores) and adds llama.cpp on the same GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${BITS:-16 8 4 3 2}
LENS=${LENS:-1024,4096,8192}
GEN=${GEN:-128}
REPEAT=${REPEAT:-1}
THREADS=${THREADS:-2}
OUT=${OUT:-bench/results/profile-smollm2}
PLOT=${PLOT:-docs/img/profile-smollm2.png}
t0=$(date +%s)
bundles=()
for b in $BITS; do
    dir=bundles/smollm2-${b}bit
    # re-export unless a complete bundle with these settings is there already
    if ! .venv/bin/python -c "import json,sys; m=json.load(open('$dir/manifest.json')); p=m['policy']; sys.exit(p['average_bits']!=$b or p['window']!=1024 or m['graphs'].get('weights_dtype')!='gguf')" 2>/dev/null; then
        .venv/bin/edgekv export default --bits "$b" --window 1024 -o "$dir" --force
    fi
    bundles+=("$dir")
done
baselines=(--baseline hf)
case "${ONNX:-optimum}" in
    optimum)
        [ -f bench/optimum-baseline/model.onnx ] || bash bench/export_optimum_baseline.sh bench/optimum-baseline
        baselines+=(--baseline onnx bench/optimum-baseline) ;;
    torch)
        [ -f bench/onnx-baseline/model.onnx ] || .venv/bin/python bench/export_onnx_baseline.py -o bench/onnx-baseline
        baselines+=(--baseline onnx bench/onnx-baseline) ;;
    0) ;;
    *) echo "ONNX must be optimum, torch or 0" >&2; exit 2 ;;
esac
if [ "${LLAMACPP:-0}" = 1 ]; then
    .venv/bin/python -c "import llama_cpp" 2>/dev/null || .venv/bin/pip install -q llama-cpp-python
    gguf=$(.venv/bin/python -c "from edgekv.export.model_loading import resolve_model_path; print(resolve_model_path('default'))")
    baselines+=(--baseline llamacpp "$gguf")
fi
.venv/bin/edgekv profile "${bundles[@]}" "${baselines[@]}" --prompt-lens "$LENS" --gen "$GEN" \
    --repeat "$REPEAT" --warmup 1 --threads "$THREADS" --json "$OUT.json" --csv "$OUT.csv" --plot "$PLOT"
.venv/bin/python bench/profile_table.py "$OUT.json"
echo "bench/profile_smollm2.sh took $(( $(date +%s) - t0 )) s"
