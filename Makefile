# dse tasks. `make help` lists them.
PY ?= .venv/bin/python

.PHONY: help install test test-fast models paper-sizes

help: ## list the tasks
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

install: ## create .venv and install dse with its test extra
	python3 -m venv .venv && .venv/bin/pip install -e '.[test]'

test: ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

models: ## measure the paper's Table 1 models beside its published sizes
	$(PY) -m dse.models

paper-sizes: ## measure every model row of the paper's Tables 1-3 beside its published size
	$(PY) -m dse.models --tables 1 2 3
