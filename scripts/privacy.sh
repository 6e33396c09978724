#!/usr/bin/env bash
# Issue 16's measurements: what the server infers from each method's updates, without and with DP.
#
#   JOBS=2 scripts/privacy.sh none          # no DP, seeds 0,1,2 (SEEDS=... to change)
#   JOBS=2 scripts/privacy.sh local 0.01    # local DP at noise multiplier 0.01 (clip: CLIP, default 1.0)
#   JOBS=2 scripts/privacy.sh central 1.0   # central DP: the server still sees each update in the clear
#
# Each setting is a `fedslip compare --audit` of fedavg_lora, fedslip and fedper on the seed protocol
# (configs/seed_cpu.toml, the presets' defaults) in docs/results/privacy/<setting>/, then `fedslip audit
# --public-data` on every run (the server's shadow clients train on the AG News test split, public data it
# names); scripts/privacy_table.py writes docs/results/privacy/report.md from all settings.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDSLIP=${FEDSLIP:-fedslip}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-0,1,2}
CLIP=${CLIP:-1.0}
METHODS=(fedavg_lora fedslip fedper)
PUBLIC=${PUBLIC:-${FEDSLIP_DATA_DIR:-../shared/data/ag_news}/test.csv.gz}
ROOT=${ROOT:-docs/results/privacy}
EXTRA=${EXTRA:-}  # flags added to every compare (a smoke test: EXTRA="--backbone tiny ...")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mode=$1
case $mode in
    none) setting=none; flags=() ;;
    local|central) setting=$mode-sigma$2-clip$CLIP
                   flags=(--dp-mode "$mode" --dp-clip "$CLIP" --dp-noise-multiplier "$2") ;;
    *) echo "usage: $0 none | local SIGMA | central SIGMA" >&2; exit 2 ;;
esac
out=$ROOT/$setting
for m in "${METHODS[@]}"; do
    for s in ${SEEDS//,/ }; do
        echo "$FEDSLIP compare --config configs/seed_cpu.toml --methods $m --seeds $s --audit ${flags[*]} --out $out --quiet $EXTRA"
    done
done | xargs -P "$JOBS" -I{} sh -c '{} >/dev/null'
all=$(IFS=,; echo "${METHODS[*]}")
$FEDSLIP compare --config configs/seed_cpu.toml --methods "$all" --seeds "$SEEDS" --audit "${flags[@]}" --out "$out" \
    --quiet $EXTRA >/dev/null
for run in "$out"/*-seed*/; do  # the attacks: the bias direction and the one learned on shadow clients
    [ -f "$run/audit/audit.json" ] && grep -q '"shadow"' "$run/audit/audit.json" && continue
    echo "$FEDSLIP audit $run --public-data $PUBLIC"
done | xargs -P "$JOBS" -I{} sh -c '{} >/dev/null'
