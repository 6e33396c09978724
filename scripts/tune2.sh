#!/usr/bin/env bash
# Second tuning pass (validation rows only), after scripts/tune.sh showed the baseline still improving at
# lr 4e-3: a larger baseline lr, and FedSLIP at the baseline's best lr with two private-track lrs.
#   bash scripts/tune2.sh [OUT=runs/tune]
set -euo pipefail
OUT=${1:-runs/tune}
VAL="--eval-split val --val-samples-per-client 200 --quiet"
export OMP_NUM_THREADS=1
run() { local name=$1; shift; [ -f "$OUT/$name/summary.json" ] || fedslip run --out "$OUT/$name" --overwrite $VAL "$@"; }
(
  run fedavg_lr8e-3 --method fedavg_lora --lr 8e-3
  run fedslip_lr4e-3_plr1e-2 --method fedslip --kstep 0 --lr 4e-3 --private-lr 1e-2
) &
(
  while pgrep -f "runs/tune/fedslip_nomask" > /dev/null; do sleep 10; done
  run fedslip_lr4e-3_plr4e-3 --method fedslip --kstep 0 --lr 4e-3 --private-lr 4e-3
) &
wait
