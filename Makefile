# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench data clean-runs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/python -m lightning_modules.demo

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out runs/bench.json

data: $(STAMP)
	$(BIN)/python -m datamodules.synthetic --out data/synthetic --kind all

clean-runs:
	rm -rf runs lightning_logs
