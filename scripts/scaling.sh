#!/usr/bin/env bash
# Data-scaling curve (issue 12): fedavg_lora vs fedslip, seed 0, test split, configs/seed_cpu.toml with
# 250 and 1000 training rows per client (500 = seed 0 of docs/results/seed_cpu). Two queues, one thread each.
#   bash scripts/scaling.sh
#   python scripts/scaling_plot.py docs/results/scaling docs/results/seed_cpu/fedavg_lora-seed0 \
#       docs/results/seed_cpu/fedslip-seed0
set -euo pipefail
export OMP_NUM_THREADS=1
for n in 250 1000; do
  fedslip compare --config configs/seed_cpu.toml --methods fedavg_lora,fedslip --seeds 0 --samples-per-client $n \
    --out docs/results/scaling/rows$n --quiet > /dev/null &
done
wait
