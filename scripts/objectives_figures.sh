#!/usr/bin/env bash
# The figures of docs/objectives.md ("Measured"): the quickstart model trained with DDPM (the quickstart's recipe)
# and with flow matching (the same recipe, Min-SNR off), each evaluated as the quickstart is (1,000 samples,
# guidance 6, power-EMA sigma_rel 0.10, seed 0) with its samplers at equal model calls; then three short DDPM runs
# at three learning rates, ranked by the validation loss and by FD. Resumable: a finished stage is skipped.
#   bash scripts/objectives_figures.sh [OUT]      (default runs/objectives; about 1 h 15 min on 2 quiet CPU cores)
set -euo pipefail
out=${1:-runs/objectives}
train() {  # train RUN_NAME OPTIONS...: new, resumed, or left alone when finished
  local run=$out/$1; shift
  if [ -d "$run/checkpoints" ]; then mpdit train --resume "$run" --no-progress; else mpdit train --out "$run" --no-progress "$@"; fi
}
evaluate() {  # evaluate RUN_NAME RESULT_NAME OPTIONS...
  local result=$out/$2.json; [ -f "$result" ] || mpdit eval --ckpt "$out/$1" --cfg-scale 6 --num 1000 --json --out "$result" "${@:3}" > /dev/null
  python3 -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; p = json.load(open(sys.argv[1]))['protocol']; print(f\"$2: {p['sampler']} {p['steps']} steps: accuracy {100 * m['accuracy']:.1f}%, FD {m['fd_classifier']:.1f}, {m['sampling_seconds']} s\")" "$result"
}
train ddpm --min-snr-gamma 5 --lr 3e-2 --steps 3000 --compile
train flow --objective flow --lr 3e-2 --steps 3000 --compile
evaluate ddpm ddpm-ddim50 --sampler ddim --steps 50
evaluate flow flow-heun25 --sampler heun --steps 25
evaluate flow flow-euler50 --sampler euler --steps 50
evaluate flow flow-heun50 --sampler heun --steps 50
for lr in 0.003 0.01 0.03; do
  train "lr-$lr" --min-snr-gamma 5 --lr "$lr" --steps 1000
  evaluate "lr-$lr" "lr-$lr-ddim50" --sampler ddim --steps 50 --num 500
  [ -f "$out/lr-$lr-loss.json" ] || mpdit eval --ckpt "$out/lr-$lr" --loss --json --out "$out/lr-$lr-loss.json" > /dev/null
  python3 -c "import json, sys; print(f\"lr-$lr: validation loss {json.load(open(sys.argv[1]))['metrics']['val_loss']:.5f}\")" "$out/lr-$lr-loss.json"
done
