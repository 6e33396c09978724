#!/usr/bin/env bash
# Second pass (issue 12), VALIDATION rows only, after scripts/tune_math.sh showed that more private
# capacity (a private classifier head, LoRA on every linear layer) overfits: the private track's
# phase (private_phase=first: trained against the global track as received), then its learning rate,
# mask and compute around the winner. Same settings as tune_math.sh; two queues, one thread each.
#   bash scripts/tune_math2.sh [OUT=runs/tune_math]
#   python scripts/tune_table.py runs/tune_math
# (An interleaved private-lr queue was started too and stopped once private_phase=first won.)
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
  run fedslip_phase-first_plr8e-3 --method fedslip --private-phase first --private-lr 8e-3
  run fedslip_phase-first_every2 --method fedslip --private-phase first --private-every 2
) &
wait
