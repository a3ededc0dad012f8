# Two commands for a newcomer: `make test` and `make book`. Both bootstrap .venv/ when it is missing or
# when requirements.txt / pyproject.toml changed since it was built. `make help` lists every target.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pbip-installed
PROFILE ?= demo
PYTEST_ARGS ?=
# TORCH=cpu: install torch/torchvision from PyTorch's CPU-only wheel index before the rest (about 1 GB instead of
# several GB of CUDA libraries; for machines without an NVIDIA GPU). TORCH=default: what pip picks from PyPI.
TORCH ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PINS := $(shell grep -E '^(torch|torchvision)==' requirements.txt)

.PHONY: help setup test book html synth figures bench wheel clean-book

help:  ## list the targets
	@echo "make targets (variables: PROFILE=$(PROFILE), TORCH=$(TORCH), PYTEST_ARGS=..., PYTHON=$(PYTHON)):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 14

setup: $(STAMP)  ## create .venv from requirements.txt (TORCH=cpu: CPU-only torch wheels)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cpu)
	$(BIN)/python -m pip install --quiet --index-url $(TORCH_CPU_INDEX) $(TORCH_PINS)
else ifneq ($(TORCH),default)
	$(error TORCH must be 'default' or 'cpu', not '$(TORCH)')
endif
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (pbip .venv)" >/dev/null
	@touch $(STAMP)

test: $(STAMP)  ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The chapters' runs first, one process per core (measured 1.1-1.2x faster than one run after another on 2 cores,
# book/paper-scale.md), then the chapters, which only read them. JOBS=1 trains inside the chapters instead.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
book: $(STAMP)  ## execute every chapter into _build/src and build the HTML into _build/html (book/ stays untouched)
	$(BIN)/pbip book --profile $(PROFILE) $(if $(filter-out 1,$(JOBS)),--jobs $(JOBS))

html: $(STAMP)  ## build the HTML into _build/html from the chapters executed by the last `make book`
	$(BIN)/pbip book --html-only

synth: $(STAMP)  ## write the synthetic dataset into data/synth
	$(BIN)/pbip synth --out data/synth

figures: $(STAMP)  ## redraw the README's figure docs/synth_grid.png
	$(BIN)/pbip figure synth-grid --out docs/synth_grid.png

bench: $(STAMP)  ## run the speed and memory benchmarks
	$(BIN)/python benchmarks/stage1_step.py
	$(BIN)/python benchmarks/bank.py

wheel: $(STAMP)  ## build the pbip-core wheel into dist/
	rm -rf build
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	rm -rf build
	@ls dist/*.whl

clean-book:  ## remove _build (executed chapters, HTML, the offline JavaScript cache)
	rm -rf _build
