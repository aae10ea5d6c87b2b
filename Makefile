# `make demo` and `make test` work on a fresh machine: the first call creates .venv and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install test-latest

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "moka-train needs Python >= 3.11 (torch 2.15 and transformers 5.24 do); this $(PYTHON) is " + sys.version.split()[0] + ": run make with PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# The suite against the newest releases (without constraints.txt), in a venv of its own: run it before raising
# the pins in constraints.txt, to see what an upstream release breaks before a fresh install meets it.
test-latest:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "moka-train needs Python >= 3.11")'
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -e ".[dev]"
	.venv-latest/bin/python -m pytest -q
