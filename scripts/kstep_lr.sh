#!/usr/bin/env bash
# kstep_lr per method under the one K-step protocol (docs/methods.md, K-step), on validation rows only.
#
#   JOBS=2 scripts/kstep_lr.sh          # then: python scripts/kstep_lr_report.py
#
# For each preset: re-run the best trial of its study (docs/results/tuning/<preset>/best.json; the trial's own
# config.toml, eval_split = "val", seed 0) into docs/results/kstep_lr/<preset>/run, then `fedslip kstep` on it
# at each learning rate of the grid (25 steps, the protocols' K). Finished runs and K-steps are skipped, so the
# script can be rerun after an interruption. Weights and client states stay out of git (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
FEDSLIP=${FEDSLIP:-fedslip}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TUNING=${TUNING:-docs/results/tuning}
OUT=${OUT:-docs/results/kstep_lr}
GRID=${GRID:-1e-4,3e-4,1e-3,3e-3}
STEPS=${STEPS:-25}
METHODS=${METHODS:-fedavg_lora,fedslip,fedper,fedrep,fedbabu,fedsa_lora,ditto,feddpa_fixed}

lane() {  # one preset: its validation run, then the grid
    m=$1
    trial=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['best_run'])" "$TUNING/$m/best.json")
    run="$OUT/$m/run"
    if [ ! -f "$run/summary.json" ]; then
        if [ -d "$run" ]; then $FEDSLIP run --resume "$run" --quiet; else
            $FEDSLIP run --config "$TUNING/$m/$trial/config.toml" --out "$run" --quiet; fi
    fi
    for lr in ${GRID//,/ }; do
        [ -n "$(ls "$run"/kstep/steps"$STEPS"-lr"$(python -c "print(f'{float(\"$lr\"):g}')")".json 2>/dev/null)" ] && continue
        $FEDSLIP kstep --run "$run" --steps "$STEPS" --lr "$lr" >/dev/null
    done
}
mkdir -p "$OUT"
export -f lane
export FEDSLIP OUT GRID STEPS TUNING
echo "${METHODS//,/ }" | tr ' ' '\n' | xargs -P "$JOBS" -I{} bash -c 'lane {} > "$OUT/{}.log" 2>&1 || echo "kstep_lr.sh: {} failed (see $OUT/{}.log)" >&2'
