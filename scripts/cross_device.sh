#!/usr/bin/env bash
# Issue 14's cross-device comparison: fedavg_lora and FedSLIP on configs/cross_device.toml (100 clients,
# Dirichlet 0.3, 10% sampled), each at its learning rates tuned on the seed protocol
# (docs/results/tuning/<method>/best.toml): no study was run at 100 clients. The two runs go side by side
# (one thread each), then `fedslip report` writes docs/results/cross_device/report.md from both.
#
#   SEEDS=0 scripts/cross_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FEDSLIP=${FEDSLIP:-fedslip}
SEEDS=${SEEDS:-0}
OUT=${OUT:-docs/results/cross_device}
EXTRA=${EXTRA:-}  # flags added to both runs (a smoke test: EXTRA="--backbone tiny --rounds 2")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(compare --config configs/cross_device.toml --seeds "$SEEDS" --out "$OUT" --quiet)
$FEDSLIP "${common[@]}" --methods fedavg_lora --lr 0.0059103170774253075 --kstep-lr 0.00044303752452182633 \
    $EXTRA >/dev/null &
a=$!
$FEDSLIP "${common[@]}" --methods fedslip --lr 0.006021952010466462 --private-lr 0.003365534250023129 \
    --kstep-lr 0.001 $EXTRA >/dev/null &
b=$!
wait $a; wait $b
$FEDSLIP report "$OUT" --command "SEEDS=$SEEDS scripts/cross_device.sh"
