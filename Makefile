# polypsam: common tasks. `make help` lists them.
PYTHON ?= python
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= disabled
export OMP_NUM_THREADS ?= 2

.PHONY: help install demo test test-fast lint format clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "%-12s %s\n", $$1, $$2}'

install: ## install polypsam (editable) with test tools
	$(PYTHON) -m pip install -e ".[dev]"

demo: ## the embedded default: LiteMedSAM on synthetic data, a few minutes on a CPU
	$(PYTHON) -m polypsam.train +experiment=demo

test: ## the full test suite (real Lightning, Hydra, DDP on gloo, real images), one worker per core
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-fast: ## skip the slow real-data and multi-process tests
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: ## ruff
	$(PYTHON) -m ruff check src tests benchmarks

format:
	$(PYTHON) -m ruff format src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
