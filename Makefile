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

# OpenVINO and ONNX Runtime tests run in a pytest process of their own (an xdist worker that had run other
# files before them was seen to die at their teardown), beside the xdist run rather than after it: about a
# minute of one core, taken from the gaps the xdist run leaves while its tests wait on subprocesses; their
# report follows the xdist run's. One xdist worker per core (three on two cores made make test-fast 11% slower,
# README Development). A crashed worker fails the run instead of being replaced.
XDIST := -n 2 --dist loadfile --max-worker-restart=0
RUNTIME_TESTS := tests/test_runtime.py
RUNTIME_LOG := .pytest_cache/runtime-tests.log
define beside_runtime_tests
	@mkdir -p .pytest_cache
	@$(PYTHON) -m pytest -q -p no:xdist $(1) $(RUNTIME_TESTS) > $(RUNTIME_LOG) 2>&1 & rt=$$!; \
	$(PYTHON) -m pytest -q $(XDIST) $(1) --ignore=$(RUNTIME_TESTS); main=$$?; \
	wait $$rt; runtime=$$?; echo "== $(RUNTIME_TESTS), in a process of its own:"; cat $(RUNTIME_LOG); \
	exit $$(( main || runtime ))
endef

test: ## the full test suite (real Lightning, Hydra, DDP on gloo, real images)
	$(call beside_runtime_tests,)

test-fast: ## skip the slow real-data and multi-process tests
	$(call beside_runtime_tests,-m "not slow")

lint: ## ruff
	$(PYTHON) -m ruff check src tests benchmarks

format:
	$(PYTHON) -m ruff format src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
