#!/usr/bin/env bash
# Issue 24 section 4 (docs/results.md): the gradient noise scale of DiT (constant lr 3e-3 after a 200-step warm-up)
# and MP scale-rotation-gate (3e-2, EDM2 schedule) at steps 1k/2k/3k/5k of the 5,000-step MNIST recipe, under DDPM
# and under flow matching, 2 seeds under DDPM and the flow grid's 3. The runs come from the grid files themselves, so they are the grids' rows:
#   DDPM: docs/grids/mnist-5k-lr.json retrained into OUT/ddpm-runs (its issue-11 checkpoints were never kept), with a
#         cheap side evaluation (100 samples at guidance 3) since only the checkpoints are wanted here;
#   flow: docs/grids/mnist-5k-flow.json's own runs in docs/results/mnist-5k-flow (seeds 0-2 of the two rows, the
#         grid's seeds at each family's best).
# Then `mpdit gradnoise` (32 batches of 64, 5 bins, raw weights) on every checkpoint, written to
# OUT/OBJECTIVE/ROW/seed-S/step-N.json, and OUT/results.md + OUT/noise-scale.png. Resumable: finished runs and
# measurements are skipped. Checkpoints are never committed, so a run finished in an earlier session's work tree
# may have lost them: its missing measurements are listed as such and skipped (the report counts the seeds each
# figure has), never retrained over the grid's records.
#   bash scripts/gradnoise_grid.sh [OUT]      (default docs/results/gradnoise; about 5 h on 2 quiet CPU cores,
#                                             of which the 32 measurements take about 1 h)
# The same checkpoints at their power-function EMA (the weights the samples come from), without retraining:
#   WEIGHTS=sigma-0.100 DDPM_OUT=docs/results/gradnoise/ddpm-runs bash scripts/gradnoise_grid.sh docs/results/gradnoise-ema
# Smoke test at tiny scale: FLOW_OUT=/tmp/f STEPS="2 4" ABLATE_OPTIONS="--model DiT-Nano/4 --steps 4 --eval-steps 2
#   --batch-size 16 --eval-num 10 --sample-steps 2 --cfg-scale 3" bash scripts/gradnoise_grid.sh /tmp/g
set -euo pipefail
out=${1:-docs/results/gradnoise}
rows=dit-warmup@lr=0.003,mp-srg@lr=0.03
flow_runs=${FLOW_OUT:-docs/results/mnist-5k-flow}
ddpm_runs=${DDPM_OUT:-$out/ddpm-runs}
weights=${WEIGHTS:-raw}
steps=${STEPS:-1000 2000 3000 5000}
ddpm_seeds=2
flow_seeds=3
# shellcheck disable=SC2086  # ABLATE_OPTIONS is a list of options
mpdit ablate --grid docs/grids/mnist-5k-lr.json --out "$ddpm_runs" --only "$rows" --seeds "$ddpm_seeds" --eval-num 100 \
  --cfg-scale 3 ${ABLATE_OPTIONS:-} > /dev/null
# shellcheck disable=SC2086
mpdit ablate --grid docs/grids/mnist-5k-flow.json --out "$flow_runs" --only "$rows" --seeds "$flow_seeds" ${ABLATE_OPTIONS:-} > /dev/null
for objective in ddpm flow; do
  runs=$ddpm_runs/runs seeds=$ddpm_seeds
  [ "$objective" = flow ] && runs=$flow_runs/runs seeds=$flow_seeds
  for row in ${rows//,/ }; do
    for seed in $(seq 0 $((seeds - 1))); do
      for step in $steps; do
        result=$out/$objective/$row/seed-$seed/step-$step.json
        [ -f "$result" ] && continue
        checkpoint=$runs/$row/seed-$seed/checkpoints/$(printf 'step-%07d' "$step")
        if [ ! -d "$checkpoint" ]; then
          echo "gradnoise_grid: $objective $row seed $seed step $step not measured: $checkpoint is not on disk"
          continue
        fi
        mkdir -p "$(dirname "$result")"
        mpdit gradnoise --weights "$weights" --ckpt "$checkpoint" --out "$result" | sed -n 1p
      done
    done
  done
done
python3 scripts/gradnoise_report.py "$out"
