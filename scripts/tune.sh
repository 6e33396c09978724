#!/usr/bin/env bash
# Hyperparameter selection on VALIDATION rows carved from the clients' train data (eval_split=val);
# the test split is never looked at here. Two queues run side by side with one thread each.
#   bash scripts/tune.sh [OUT=runs/tune]
# Each run's summary.json holds the validation accuracies; scripts/tune_table.py prints the table.
set -euo pipefail
OUT=${1:-runs/tune}
# lr / private_lr 2e-3 were the defaults when this pass ran; spelled out so that it still reproduces.
VAL="--eval-split val --val-samples-per-client 200 --quiet --lr 2e-3 --private-lr 2e-3"
export OMP_NUM_THREADS=1
run() { local name=$1; shift; [ -f "$OUT/$name/summary.json" ] || fedslip run --out "$OUT/$name" --overwrite $VAL "$@"; }
(
  for lr in 5e-4 1e-3 2e-3 4e-3; do run fedavg_lr$lr --method fedavg_lora --lr $lr; done
) &
(
  run fedslip --method fedslip --kstep 0
  run fedslip_warmup0 --method fedslip --kstep 0 --private-warmup-rounds 0
  run fedslip_mu0 --method fedslip --kstep 0 --fedprox-mu 0
  run fedslip_nomask --method fedslip --kstep 0 --private-target-sparsity 0
) &
wait
