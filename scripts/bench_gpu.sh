#!/usr/bin/env bash
# GPU figures for docs/performance.md: training and sampling step of the main variants against the
# DiT baseline, DiT-S/2 and DiT-B/2 on 32x32x4 latents, bf16 and fp32, eager and compiled.
# Usage: bash scripts/bench_gpu.sh [OUT_DIR]   (one GPU; a few minutes)
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for model in DiT-S/2 DiT-B/2; do
  for dtype in bf16 fp32; do
    for compile in "" "--compile"; do
      name="${model//\//-}-$dtype${compile:+-compiled}"
      mpdit bench --device cuda --model "$model" --input-size 32 --batch 64 --dtype "$dtype" $compile \
        --repeats 20 --warmup 5 --out "$out/$name.json" | tee "$out/$name.txt"
    done
  done
done
