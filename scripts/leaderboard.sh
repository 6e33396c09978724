#!/usr/bin/env bash
# The leaderboard, start to end, in phases that each skip what is finished (rerun after any interruption):
#
#   JOBS=2 scripts/leaderboard.sh                       # this CPU machine: two one-thread lanes (many hours)
#   JOBS=12 TUNE_TIMEOUT=240 scripts/leaderboard.sh     # one GPU (docs/results/leaderboard/README.md)
#   PHASES=rescore,kstep_lr scripts/leaderboard.sh      # some phases only
#
# sweeps    each preset's study on validation rows of the seed protocol (docs/results/tuning/<preset>/): 12
#           finished trials, TPE + median pruning, the preset's default space (fedslip.tune.DEFAULT_SPACES);
#           each maximizes what it is reported on. fedbabu (K-step objective: no pruning) averages validation
#           seeds 0 and 1 in every trial. TUNE_TIMEOUT (seconds) stops starting trials.
# rescore   every other study's 2 best complete trials run again on validation seed 1; the best mean over
#           seeds 0 and 1 is the published choice (`fedslip tune --rescore 2 --rescore-seeds 1`, best.toml).
# kstep_lr  scripts/kstep_lr.sh: `fedslip kstep` at a grid of learning rates on the chosen trial's seed-1 run
#           (docs/results/kstep_lr/). A study that searched kstep_lr itself (fedavg_lora) keeps its value.
# configs   one published config per method and protocol ($BOARD/configs/<protocol>/<preset>.toml): the
#           protocol's config + the study's best_params + kstep_lr.
# runs      `fedslip compare` for every preset x seed: SEEDS_SEED (0-4) on the seed protocol, SEEDS_DIRICHLET
#           (0-2) on the Dirichlet protocol, on the test split.
# kmatch    fedavg_lora + equal-compute K-step: `fedslip kstep --run fedavg_lora-seedS --match-compute
#           fedslip-seedS` per seed (recorded in the run's summary.json; the reports show it as a row).
# reports   report.md, results.json and plots per protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDSLIP=${FEDSLIP:-fedslip}
PY=${PY:-python}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PHASES=${PHASES:-sweeps,rescore,kstep_lr,configs,runs,kmatch,reports}
SEEDS_SEED=${SEEDS_SEED:-0,1,2,3,4}
SEEDS_DIRICHLET=${SEEDS_DIRICHLET:-0,1,2}
TRIALS=${TRIALS:-12}
export TUNING=${TUNING:-docs/results/tuning}
BOARD=${BOARD:-docs/results/leaderboard}
export KSTEP_OUT=${KSTEP_OUT:-docs/results/kstep_lr}
EXTRA=${EXTRA:-}  # flags added to every tune, run and compare command (a smoke test: EXTRA="--backbone tiny ...")
read -ra METHODS <<< "${METHODS:-fedavg_lora fedslip fedper fedrep fedbabu fedsa_lora ditto feddpa_fixed}"
declare -A OBJECTIVE=([fedavg_lora]=global=1,kstep=1 [fedslip]=global=1,personalized=1 [fedper]=personalized
                      [fedrep]=personalized [fedbabu]=kstep [fedsa_lora]=personalized [ditto]=personalized
                      [feddpa_fixed]=personalized)
declare -A TUNE_SEEDS=([fedbabu]="--seeds 0,1")
timeout_flag=${TUNE_TIMEOUT:+--timeout $TUNE_TIMEOUT}
phase() { [[ ",$PHASES," == *",$1,"* ]]; }
lanes() { xargs -P "$JOBS" -I{} sh -c '{} >/dev/null' || echo "leaderboard.sh: some commands failed (above)" >&2; }
study() {  # the tune command of preset $1 (the same command continues, and with $2, rescores the study)
    echo "$FEDSLIP tune --config configs/seed_cpu.toml --method $1 --maximize ${OBJECTIVE[$1]} --trials $TRIALS \
${TUNE_SEEDS[$1]:-} --out $TUNING/$1 --quiet $timeout_flag $2 $EXTRA"
}

if phase sweeps; then
    for m in "${METHODS[@]}"; do study "$m" ""; done | lanes
fi
if phase rescore; then
    for m in "${METHODS[@]}"; do
        if [ -z "${TUNE_SEEDS[$m]:-}" ]; then study "$m" "--rescore 2 --rescore-seeds 1"; fi  # fedbabu has seed 1
    done | lanes
fi
if phase kstep_lr; then
    METHODS=$(IFS=,; echo "${METHODS[*]}") JOBS=$JOBS OUT=$KSTEP_OUT EXTRA=$EXTRA FEDSLIP=$FEDSLIP scripts/kstep_lr.sh
    "$PY" scripts/kstep_lr_report.py "$KSTEP_OUT" > /dev/null
fi
if phase configs; then
    "$PY" - "$TUNING" "$KSTEP_OUT/kstep_lr.json" "$BOARD/configs" "${METHODS[@]}" <<'EOF'
import json, sys, tomllib, tomli_w
from pathlib import Path
tuning, kstep_lr, out, methods = Path(sys.argv[1]), json.load(open(sys.argv[2])), Path(sys.argv[3]), sys.argv[4:]
for protocol, base in (("seed", "configs/seed_cpu.toml"), ("dirichlet", "configs/dirichlet.toml")):
    (out / protocol).mkdir(parents=True, exist_ok=True)
    for m in methods:
        best = json.load(open(tuning / m / "best.json"))
        config = {**tomllib.load(open(base, "rb")), "method": m, **best["best_params"]}
        if "kstep_lr" in best["best_params"]:
            source = "its study"
        elif m in kstep_lr:
            source, config["kstep_lr"] = sys.argv[2], kstep_lr[m]["kstep_lr"]
        else:
            sys.exit(f"leaderboard.sh: no kstep_lr for {m} in {sys.argv[2]}: run the kstep_lr phase first")
        header = (f"# {base} with the keys tuned on the seed protocol ({tuning / m / 'best.json'}, trial "
                  f"{best['best_trial']}) and kstep_lr from {source}\n")
        (out / protocol / f"{m}.toml").write_text(header + tomli_w.dumps(config))
EOF
fi
protocols() { echo "seed configs/seed_cpu.toml $SEEDS_SEED"; echo "dirichlet configs/dirichlet.toml $SEEDS_DIRICHLET"; }
if phase runs; then
    protocols | while read -r protocol config seeds; do
        for m in "${METHODS[@]}"; do for s in ${seeds//,/ }; do
            echo "$FEDSLIP compare --config $config --methods $m --seeds $s \
--method-config $m=$BOARD/configs/$protocol/$m.toml --out $BOARD/$protocol --quiet $EXTRA"
        done; done
    done | lanes
fi
if phase kmatch; then
    protocols | while read -r protocol config seeds; do for s in ${seeds//,/ }; do
        run=$BOARD/$protocol/fedavg_lora-seed$s
        grep -q equal_compute_kstep_accuracy "$run/summary.json" 2>/dev/null || \
            echo "$FEDSLIP kstep --run $run --match-compute $BOARD/$protocol/fedslip-seed$s"
    done; done | lanes
fi
if phase reports; then  # every run is finished: these only write report.md, results.json, plots
    all=$(IFS=,; echo "${METHODS[*]}")
    protocols | while read -r protocol config seeds; do
        flags=(); for m in "${METHODS[@]}"; do flags+=(--method-config "$m=$BOARD/configs/$protocol/$m.toml"); done
        $FEDSLIP compare --config "$config" --methods "$all" --seeds "$seeds" "${flags[@]}" --out "$BOARD/$protocol" \
            --quiet $EXTRA
    done
fi
