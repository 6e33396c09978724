#!/usr/bin/env bash
# Issue 13's leaderboard, start to end: each baseline's validation sweep, then `fedslip compare` over every
# preset x seeds 0,1,2 x both protocols at each method's tuned settings.
#
#   JOBS=2 scripts/leaderboard.sh                       # this CPU machine: two one-thread lanes (many hours)
#   JOBS=12 TUNE_TIMEOUT=240 scripts/leaderboard.sh     # one GPU (docs/results/leaderboard/README.md)
#
# 1. Sweeps (docs/results/tuning/<preset>/): the same budget as the fedavg_lora and fedslip studies already
#    there (12 finished trials, TPE + median pruning, the preset's default space: its learning rates and its
#    own knob, fedslip.tune.DEFAULT_SPACES) on validation rows of the seed protocol; each maximizes what it is
#    reported on (personalized accuracy; fedbabu: accuracy after its K-step on the head). TUNE_TIMEOUT (seconds)
#    stops starting trials; the same command continues a study.
# 2. Runs: the seed protocol at each study's best.toml; the Dirichlet protocol at configs/dirichlet.toml plus
#    the same tuned keys (best.json's best_params, written to docs/results/leaderboard/dirichlet-configs/).
#    `compare` skips finished runs, so the script can be rerun after any interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDSLIP=${FEDSLIP:-fedslip}
PY=${PY:-python}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS=${SEEDS:-0,1,2}
TUNING=${TUNING:-docs/results/tuning}
BOARD=${BOARD:-docs/results/leaderboard}
EXTRA=${EXTRA:-}  # flags added to every tune and compare command (a smoke test: EXTRA="--backbone tiny ...")
METHODS=(fedavg_lora fedslip fedper fedrep fedbabu fedsa_lora ditto feddpa_fixed)
declare -A OBJECTIVE=([fedper]=personalized [fedrep]=personalized [fedbabu]=kstep [fedsa_lora]=personalized
                      [ditto]=personalized [feddpa_fixed]=personalized)
timeout_flag=${TUNE_TIMEOUT:+--timeout $TUNE_TIMEOUT}

for m in "${!OBJECTIVE[@]}"; do
    echo "$FEDSLIP tune --config configs/seed_cpu.toml --method $m --trials 12 --maximize ${OBJECTIVE[$m]} \
--out $TUNING/$m --quiet $timeout_flag $EXTRA"
done | xargs -P "$JOBS" -I{} sh -c '{} >/dev/null' || echo "leaderboard.sh: some commands failed (above)" >&2

mkdir -p "$BOARD/dirichlet-configs"
for m in "${METHODS[@]}"; do  # the Dirichlet protocol with the tuned keys of the seed protocol's study
    [ -f "$TUNING/$m/best.json" ] || { echo "leaderboard.sh: no finished study in $TUNING/$m" >&2; continue; }
    "$PY" - "$m" "$TUNING/$m/best.json" "$BOARD/dirichlet-configs/$m.toml" <<'EOF'
import json, sys, tomllib, tomli_w
method, best, out = sys.argv[1:]
config = tomllib.load(open("configs/dirichlet.toml", "rb"))
config.update(method=method, **json.load(open(best))["best_params"])
header = f"# configs/dirichlet.toml with the keys tuned on the seed protocol ({best})\n"
open(out, "w").write(header + tomli_w.dumps(config))
EOF
done

method_config() {  # the --method-config flag of one method ($2) on one protocol ($1)
    if [ "$1" = seed ]; then echo "--method-config $2=$TUNING/$2/best.toml"
    else echo "--method-config $2=$BOARD/dirichlet-configs/$2.toml"; fi
}
all=$(IFS=,; echo "${METHODS[*]}")
for protocol in seed dirichlet; do
    config=configs/seed_cpu.toml; [ "$protocol" = dirichlet ] && config=configs/dirichlet.toml
    for m in "${METHODS[@]}"; do
        for s in ${SEEDS//,/ }; do
            echo "$FEDSLIP compare --config $config --methods $m --seeds $s $(method_config "$protocol" "$m") \
--out $BOARD/$protocol --quiet $EXTRA"
        done
    done
done | xargs -P "$JOBS" -I{} sh -c '{} >/dev/null' || echo "leaderboard.sh: some commands failed (above)" >&2

for protocol in seed dirichlet; do  # every run is finished: these only write report.md, results.json, plots
    config=configs/seed_cpu.toml; [ "$protocol" = dirichlet ] && config=configs/dirichlet.toml
    flags=(); for m in "${METHODS[@]}"; do read -ra f <<< "$(method_config "$protocol" "$m")"; flags+=("${f[@]}"); done
    $FEDSLIP compare --config $config --methods "$all" --seeds "$SEEDS" "${flags[@]}" \
        --out "$BOARD/$protocol" --quiet $EXTRA
done
