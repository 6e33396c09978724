#!/usr/bin/env bash
# FedSLIP levers after the FedProx fix (issue 12), on VALIDATION rows only (eval_split=val; the test
# split is never looked at). configs/seed_cpu.toml, seed 0; two queues side by side, one thread each.
#   bash scripts/tune_math.sh [OUT=runs/tune_math]
#   python scripts/tune_table.py runs/tune_math
# K-step of the baseline is tuned afterwards on its final state: scripts/tune_kstep.sh.
set -euo pipefail
OUT=${1:-runs/tune_math}
VAL="--config configs/seed_cpu.toml --eval-split val --val-samples-per-client 200 --quiet"
export OMP_NUM_THREADS=1
run() { local name=$1; shift; [ -f "$OUT/$name/summary.json" ] || fedslip run --out "$OUT/$name" --overwrite $VAL "$@"; }
(
  run fedslip --method fedslip --kstep 0
  run fedslip_head-bias --method fedslip --kstep 0 --private-head bias
  run fedslip_head-classifier --method fedslip --kstep 0 --private-head classifier
  run fedslip_head-classifier_sparsity0 --method fedslip --kstep 0 --private-head classifier --private-target-sparsity 0
) &
(
  run fedavg_lora --method fedavg_lora
  run fedslip_head-classifier_mu0.1 --method fedslip --kstep 0 --private-head classifier --fedprox-mu 0.1
  run fedslip_head-classifier_allmods --method fedslip --kstep 0 --private-head classifier --private-targets query,key,value,dense
  run fedslip_head-classifier_every2 --method fedslip --kstep 0 --private-head classifier --private-every 2
) &
wait
