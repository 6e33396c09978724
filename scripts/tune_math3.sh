#!/usr/bin/env bash
# Third pass (issue 12), VALIDATION rows only, around the current fedslip preset (private_phase=first):
# the lottery-ticket mask (target sparsity -> accuracy vs private density; prune rate; rewinding), the
# private rank, and the private phase's length (private_local_steps). Same settings as tune_math.sh.
# Two queues, one thread each (queue 2 ran after the scaling fedavg runs in the session that made it):
#   bash scripts/tune_math3.sh runs/tune_math 1 & bash scripts/tune_math3.sh runs/tune_math 2 & wait
#   python scripts/tune_table.py runs/tune_math
set -euo pipefail
OUT=${1:-runs/tune_math}
QUEUE=${2:-all}
VAL="--config configs/seed_cpu.toml --eval-split val --val-samples-per-client 200 --quiet --kstep 0"
export OMP_NUM_THREADS=1
run() { local name=$1; shift; [ -f "$OUT/$name/summary.json" ] || fedslip run --out "$OUT/$name" --overwrite $VAL --method fedslip "$@"; }
if [ "$QUEUE" = 1 ] || [ "$QUEUE" = all ]; then
  # 5 pruning rounds at rate r reach 1 - (1 - r)^5; the rates below reach each target (capped there)
  run fedslip_phase-first_sparsity0.25 --private-target-sparsity 0.25
  run fedslip_phase-first_sparsity0.75 --private-target-sparsity 0.75 --private-prune-rate 0.3
  run fedslip_phase-first_sparsity0.9 --private-target-sparsity 0.9 --private-prune-rate 0.45
  run fedslip_phase-first_plocal2x --private-local-steps 32
fi
# Queues 2 and 3 were added while queue 1 ran; the session that made the record ran queue 1, then queue 2,
# in one lane and queue 3 in the other, after the data-scaling runs (scripts/scaling.sh):
#   bash scripts/tune_math3.sh runs/tune_math 1 && bash scripts/tune_math3.sh runs/tune_math 2 &
#   bash scripts/tune_math3.sh runs/tune_math 3 & wait
if [ "$QUEUE" = 2 ] || [ "$QUEUE" = all ]; then
  run fedslip_phase-first_rate0.5 --private-prune-rate 0.5
  run fedslip_phase-first_rewind2 --private-rewind-round 2
  run fedslip_phase-first_head-bias --private-head bias
fi
if [ "$QUEUE" = 3 ] || [ "$QUEUE" = all ]; then
  run fedslip_phase-first_prank4 --private-rank 4 --private-alpha 8
  run fedslip_phase-first_prank16 --private-rank 16 --private-alpha 32
fi
