#!/usr/bin/env bash
# Second pass (issue 12), VALIDATION rows only: the private track's phase and learning rate, after
# scripts/tune_math.sh showed that more private capacity (a private classifier head, LoRA on every
# linear layer) overfits. Same settings as tune_math.sh; two queues, one thread each.
#   bash scripts/tune_math2.sh [OUT=runs/tune_math]
set -euo pipefail
OUT=${1:-runs/tune_math}
VAL="--config configs/seed_cpu.toml --eval-split val --val-samples-per-client 200 --quiet --kstep 0"
export OMP_NUM_THREADS=1
run() { local name=$1; shift; [ -f "$OUT/$name/summary.json" ] || fedslip run --out "$OUT/$name" --overwrite $VAL "$@"; }
(
  run fedslip_phase-first --method fedslip --private-phase first
  run fedslip_phase-first_plr1e-3 --method fedslip --private-phase first --private-lr 1e-3
  run fedslip_phase-first_sparsity0 --method fedslip --private-phase first --private-target-sparsity 0
) &
(
  while [ -n "${WAIT_PID:-}" ] && kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done
  run fedslip_plr1e-3 --method fedslip --private-lr 1e-3
  run fedslip_plr2e-3 --method fedslip --private-lr 2e-3
  run fedslip_plr8e-3 --method fedslip --private-lr 8e-3
) &
wait
# The interleaved learning-rate queue above was stopped after private_phase=first won (fedslip_plr1e-3
# unfinished, plr2e-3 / plr8e-3 never run); this queue replaced it:
#   bash scripts/tune_math2.sh --phase-first-lr [OUT]
