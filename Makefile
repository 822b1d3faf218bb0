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

# OpenVINO and ONNX Runtime tests run in a process of their own: an xdist worker that had run other files
# before them was seen to die at their teardown. A crashed worker fails the run instead of being replaced.
XDIST := -n 2 --dist loadfile --max-worker-restart=0
RUNTIME_TESTS := tests/test_runtime.py

test: ## the full test suite (real Lightning, Hydra, DDP on gloo, real images), one worker per core
	$(PYTHON) -m pytest -q $(XDIST) --ignore=$(RUNTIME_TESTS)
	$(PYTHON) -m pytest -q -p no:xdist $(RUNTIME_TESTS)

test-fast: ## skip the slow real-data and multi-process tests
	$(PYTHON) -m pytest -q $(XDIST) -m "not slow" --ignore=$(RUNTIME_TESTS)
	$(PYTHON) -m pytest -q -p no:xdist -m "not slow" $(RUNTIME_TESTS)

lint: ## ruff
	$(PYTHON) -m ruff check src tests benchmarks

format:
	$(PYTHON) -m ruff format src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
