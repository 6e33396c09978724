#!/usr/bin/env bash
# Compression sweep: fedavg_lora and fedslip on configs/seed_cpu.toml, one queue per argument,
# one thread each. An argument is a comma-separated list of settings run one after another in that
# queue; a setting is a codec for both directions (`int4`) or `UPLOAD:DOWNLOAD` (`topk+int8:int4`):
#   bash scripts/compression.sh int4,topk,fp16 topk+int8,int8,topk+int4
#   bash scripts/compression.sh topk+int8:int4
# Seeds (SEEDS, default 0): seeds 1,2 for the settings the README recommends, e.g.
#   SEEDS=0,1,2 bash scripts/compression.sh int4 topk+int8:int4
# Runs go to docs/results/compression/<setting> (`:` written as `__`). The fp32 runs are
# docs/results/seed_cpu (the same code path: fp32 payloads are unchanged). Then:
#   python scripts/compression_report.py
set -euo pipefail
export OMP_NUM_THREADS=1
for queue in "$@"; do
  (
    for setting in ${queue//,/ }; do
      upload="${setting%%:*}"
      download="${setting##*:}"
      fedslip compare --config configs/seed_cpu.toml --methods fedavg_lora,fedslip --seeds "${SEEDS:-0}" \
        --upload-codec "$upload" --download-codec "$download" \
        --out "docs/results/compression/${setting//:/__}" --quiet
    done
  ) > /dev/null 2>&1 &
done
wait
