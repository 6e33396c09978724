#!/usr/bin/env bash
# Data-scaling curve: fedavg_lora vs fedslip, seed 0, test split, configs/seed_cpu.toml with
# other training-row counts per client (500 = seed 0 of docs/results/seed_cpu). One queue per size, one
# thread each. At 1000 rows seeds 1 and 2 were added (seed 0 alone overstated the result):
#   bash scripts/scaling.sh 250 1000 2000
#   fedslip compare --config configs/seed_cpu.toml --methods fedavg_lora,fedslip --seeds 0,1,2 \
#       --samples-per-client 1000 --out docs/results/scaling/rows1000
#   python scripts/scaling_plot.py docs/results/scaling docs/results/seed_cpu/fedavg_lora-seed0 \
#       docs/results/seed_cpu/fedslip-seed0
set -euo pipefail
export OMP_NUM_THREADS=1
for n in "${@:-250}"; do
  fedslip compare --config configs/seed_cpu.toml --methods fedavg_lora,fedslip --seeds 0 --samples-per-client "$n" \
    --out "docs/results/scaling/rows$n" --quiet > /dev/null &
done
wait
