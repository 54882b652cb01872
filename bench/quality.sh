#!/usr/bin/env bash
# BENCHMARKS.md quality table: SmolLM2-135M, 16k tokens of the Jargon File through the
# cache (4 sequences of 4096), fp16 without eviction, fp16 / 8 / 4 / 3 / 2 bits with
# window 1024 + 4 sinks, block 32, group 32, and passkey at 1024 and 2048 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/quality-smollm2.json}
.venv/bin/edgekv eval default --bits 16,8,4,3,2 --window 1024 --sinks 4 --block 32 --group 32 \
    --full-cache --max-tokens 16384 --sequences 4 \
    --passkey-lengths 1024,2048 --passkey-depths 0.1,0.5,0.9 --json "$OUT" "$@"
.venv/bin/python bench/quality_table.py "$OUT"
