#!/usr/bin/env bash
# GPU figures for docs/performance.md, in one go (5-6 minutes on one H100/H200): training and sampling
# step time and peak memory of the main variants against the DiT baseline (mpdit bench), eager and compiled,
# then scripts/gpu_check.py (compiled training checked against eager on the GPU, then a short training run per
# variant), then the training loop's step against the bare step (mpdit bench --loop). Runs from the checkout with the machine's own PyTorch, nothing installed:
#     PYTHONPATH=. bash scripts/bench_gpu.sh [OUT_DIR]
# SMOKE=1 runs the same commands on the CPU with a tiny model, to check the script itself.
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.}
if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu; s2=DiT-Nano/4; xl2=DiT-Nano/4; batch=2; xl_batch=2; repeats=1; check="--device cpu --model DiT-Nano/4 --batch-size 2 --steps 2"
else
  device=cuda; s2=DiT-S/2; xl2=DiT-XL/2; batch=256; xl_batch=64; repeats=15
  check="--steps 150"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
fi
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
bench() {  # NAME, then mpdit bench options
  name=$1; shift
  echo "== $name" >&2
  python3 -m mpdit.cli.main bench --device "$device" --dtype bf16 --repeats "$repeats" --warmup 3 \
    --out "$out/$name.json" "$@" | tee "$out/$name.txt"
}
bench s2-16-eager --model "$s2" --input-size 16 --batch "$batch"
bench s2-16-compiled --model "$s2" --input-size 16 --batch "$batch" --compile
bench s2-32-eager --model "$s2" --input-size 32 --batch "$batch"
bench xl2-32-eager --model "$xl2" --input-size 32 --batch "$xl_batch"
echo "== gpu_check" >&2
python3 scripts/gpu_check.py --check-compiled $check | tee "$out/gpu_check.jsonl"
# last, so that a failure here costs none of the figures above: the training loop's step (batch assembled on the
# host and copied, EMAs, guard) against the bare step, which says whether a device-side dataset would pay
bench s2-16-loop --model "$s2" --input-size 16 --batch "$batch" --loop --variants "all:scale-rotation-gate"
