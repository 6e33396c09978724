# Quick start:  make run   (set up .venv, run the default FedSLIP experiment)
#               make test  (the test suite; .ci/run calls exactly this)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data/ag_news)
export FEDSLIP_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/train.csv.gz),$(SHARED_DATA),)
export HF_HUB_DISABLE_TELEMETRY := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
METHOD ?= fedslip
OUT ?= runs/$(METHOD)
ARGS ?=

.PHONY: setup run compare test test-fast lint clean

$(BIN)/fedslip: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/fedslip

run: setup
	$(BIN)/fedslip run --method $(METHOD) --out $(OUT) $(ARGS)

# The seed's comparison (fedavg_lora, dual_naive, fedslip x 3 seeds), the centralized reference at its own
# learning rate (tuned on validation rows, docs/results/tuning.md), and one report over all of them.
CENTRALIZED_LR ?= 5e-4
compare: setup
	$(BIN)/fedslip compare --config configs/seed_cpu.toml --methods fedavg_lora,dual_naive,fedslip \
		--seeds 0,1,2 --out docs/results/seed_cpu $(ARGS)
	for s in 0 1 2; do [ -f docs/results/seed_cpu/centralized-seed$$s/summary.json ] || \
		$(BIN)/fedslip run --config configs/seed_cpu.toml --method centralized --lr $(CENTRALIZED_LR) --seed $$s \
		--out docs/results/seed_cpu/centralized-seed$$s $(ARGS) || exit 1; done
	$(BIN)/fedslip report docs/results/seed_cpu

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

# for development: the tiny-backbone tests only (-m 'not slow': no MiniLM, notebooks, Flower or other processes, benchmarks)
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: setup
	$(BIN)/ruff check fedslip tests

clean:
	rm -rf $(VENV) *.egg-info
