# Everything a newcomer needs: `make run` prunes the default real model, `make test` runs the tests.
# Both create .venv and install the package on first use (CPU torch 2.13.0 where no torch is installed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/smollm2_0.2.yaml
ARGS   ?=

.PHONY: setup run test lint bench bench-memory mutation llamacpp gguf-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/python run_global_pruning.py --config $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check pruning tests benchmarks tools
	$(BIN)/ruff format --check pruning tests benchmarks tools

bench: setup
	$(BIN)/python benchmarks/bench_analysis.py

SHAPE ?= 1b
bench-memory: setup   # make bench-memory SHAPE=13b (writes 24.6 GiB of random weights to /tmp first)
	$(BIN)/python benchmarks/memory.py --shape $(SHAPE) $(ARGS)

mutation: setup   # mutation testing on demand, not in CI (docs/mutation-testing.md): about 30 minutes on 2 cores
	$(BIN)/python -m tools.mutation $(ARGS)

LLAMACPP_VERSION := 0.3.36
llamacpp: setup   # builds llama.cpp from source through pip (18.5 minutes on 2 cores: README, Serving the pruned model)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install 'llama-cpp-python==$(LLAMACPP_VERSION)'

gguf-check: llamacpp   # llama.cpp against transformers: tiny models of every exported family, then SmolLM2
	$(BIN)/python -m pytest -q -m llamacpp tests/test_gguf_export.py
	$(BIN)/python benchmarks/gguf_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
