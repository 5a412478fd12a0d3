# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-tad demo-evad demo-blockdrop test bench gpu-check data clean-runs constraints

# pyproject.toml declares the ranges the code supports; constraints.txt pins every package to the versions the
# suite ran with (`make constraints` rewrites it from .venv). `sweeps` (W&B's sweep engine, which the tests use to
# check recipes/sweeps/) goes in with --no-deps: it declares numpy<2 but runs on numpy 2; its real imports are in
# the dev extra.
CONSTRAINTS ?= constraints.txt
PIP := $(BIN)/pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps sweeps
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/python -m lightning_modules.demos.haltingvt

demo-tad: $(STAMP)
	WANDB_SILENT=true $(BIN)/python -m lightning_modules.demos.tad

demo-evad: $(STAMP)
	WANDB_SILENT=true $(BIN)/python -m lightning_modules.demos.evad

demo-blockdrop: $(STAMP)
	WANDB_SILENT=true $(BIN)/python -m lightning_modules.demos.blockdrop

# The tests run one intra-op thread each (tests/conftest.py), in TEST_WORKERS processes (pytest-xdist; a file's
# tests stay in one process, so its shared fixtures are built once).
TEST_WORKERS ?= 2

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out runs/bench.json

# On a CUDA machine: the device paths and the GPU benchmarks, one JSON and a table (benchmarks/gpu_check.py).
gpu-check: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m benchmarks.gpu_check --out runs/gpu_check.json

data: $(STAMP)
	$(BIN)/python -m datamodules.synthetic --out data/synthetic --kind all

clean-runs:
	rm -rf runs lightning_logs

# The CUDA runtime packages follow the torch build (CUDA 12 or 13), so they are left out.
constraints: $(STAMP)
	{ echo "# The versions the test suite ran with (make installs them; pyproject.toml has the supported ranges)."; \
	  echo "# Written by 'make constraints' from .venv; the CUDA runtime packages follow the torch build."; \
	  $(BIN)/pip freeze --exclude-editable --disable-pip-version-check | grep -v -E '^(nvidia-|cuda-|triton==)'; } \
	  > constraints.txt
