#!/usr/bin/env bash
# kstep_lr per method under the one K-step protocol (docs/methods.md, K-step), on validation rows only.
#
#   JOBS=2 scripts/kstep_lr.sh          # then: python scripts/kstep_lr_report.py
#
# For each preset: the validation run of its chosen trial (docs/results/tuning/<preset>/best.json, after the
# rescore on seed 1: <best_run>-seed1, the run `fedslip tune --rescore` made; made here with the trial's own
# config at seed 1 where it is missing or holds no client states, e.g. a run made on another machine), then
# `fedslip kstep` on it at each learning rate of the grid (25 steps, the protocols' K). Finished runs and
# K-steps are skipped, so the script can be rerun after an interruption. Weights and client states stay out of
# git (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
FEDSLIP=${FEDSLIP:-fedslip}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TUNING=${TUNING:-docs/results/tuning}
OUT=${OUT:-docs/results/kstep_lr}
GRID=${GRID:-1e-4,3e-4,1e-3,3e-3}
STEPS=${STEPS:-25}
SEED=${SEED:-1}
EXTRA=${EXTRA:-}  # flags added to a run this script makes (a smoke test: EXTRA="--backbone tiny ...")
METHODS=${METHODS:-fedavg_lora,fedslip,fedper,fedrep,fedbabu,fedsa_lora,ditto,feddpa_fixed}

lane() {  # one preset: its validation run, then the grid
    m=$1
    trial=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['best_run'])" "$TUNING/$m/best.json")
    run="$TUNING/$m/$trial-seed$SEED"
    if [ ! -d "$run/clients" ] && [ -f "$run/summary.json" ]; then  # finished elsewhere: K-step needs the states
        run="$OUT/$m/run-seed$SEED"
    fi
    if [ ! -f "$run/summary.json" ]; then
        if [ -f "$run/config.toml" ]; then $FEDSLIP run --resume "$run" --quiet; else
            $FEDSLIP run --config "$TUNING/$m/$trial/config.toml" --seed "$SEED" --out "$run" --quiet $EXTRA; fi
    fi
    for lr in ${GRID//,/ }; do
        [ -f "$run/kstep/steps$STEPS-lr$(python -c "print(f'{float(\"$lr\"):g}')").json" ] && continue
        $FEDSLIP kstep --run "$run" --steps "$STEPS" --lr "$lr" >/dev/null
    done
    mkdir -p "$OUT/$m" && echo "$run" > "$OUT/$m/run.txt"  # where the report reads the grid
}
mkdir -p "$OUT"
export -f lane
export FEDSLIP OUT GRID STEPS TUNING SEED EXTRA
echo "${METHODS//,/ }" | tr ' ' '\n' | xargs -P "$JOBS" -I{} bash -c 'lane {} > "$OUT/{}.log" 2>&1 || echo "kstep_lr.sh: {} failed (see $OUT/{}.log)" >&2'
