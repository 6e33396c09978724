#!/usr/bin/env bash
# K-step of the baseline tuned on VALIDATION rows: re-run K-step on the finished validation run of
# fedavg_lora (scripts/tune_math.sh) for a grid of steps x learning rates. Each call writes
# RUN/kstep/steps<N>-lr<X>.json; python scripts/tune_table.py --kstep RUN prints the grid.
#   bash scripts/tune_kstep.sh [RUN=runs/tune_math/fedavg_lora]
set -euo pipefail
RUN=${1:-runs/tune_math/fedavg_lora}
export OMP_NUM_THREADS=1
for lr in 0.001 0.003 0.008; do
  for steps in 25 50 100; do
    [ -f "$RUN/kstep/steps$steps-lr$lr.json" ] || fedslip kstep --run "$RUN" --steps $steps --lr $lr > /dev/null
  done
done
for lr in 0.001 0.003; do
  [ -f "$RUN/kstep/steps200-lr$lr.json" ] || fedslip kstep --run "$RUN" --steps 200 --lr $lr > /dev/null
done
