# dse tasks. `make help` lists them. STUDY=NAME picks the study of the tasks that read one (default: the only
# studies/*.db, if there is one; `python -m dse.sweep --list` lists them), STORAGE=URL a DB elsewhere.
PY ?= .venv/bin/python
STUDIES := $(sort $(basename $(notdir $(wildcard studies/*.db))))
STUDY ?= $(if $(filter 1,$(words $(STUDIES))),$(STUDIES))
# A task that reads a study names it, or stops with one line saying how to pick one.
study = $(or $(STUDY),$(error pick a study: make $@ STUDY=NAME [STORAGE=URL]; $(if $(STUDIES),studies in studies/: \
	$(subst $(eval) ,$(comma) ,$(STUDIES)),no study in studies/ yet: make sweep-quick DATA=fashion_mnist runs one offline)))
comma := ,
STORAGE ?= sqlite:///studies/$(study).db
ARTIFACTS ?= studies/$(study)/artifacts
PORT ?= 8080

.PHONY: help install test test-slow models paper-sizes sweep-quick tables dashboard deploy-list deploy-measure deploy deploy-sizes bench-trainer bench-pruning bench-pruning-quick bench-gpu gpu-wheels

help: ## list the tasks
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-20s %s\n", $$1, $$2}'

install: ## create .venv and install dse with its test extra
	python3 -m venv .venv && .venv/bin/pip install -e '.[test]'

test: ## lint, format check and the tests not marked slow, two at a time (what CI runs)
	$(dir $(PY))ruff check . && $(dir $(PY))ruff format --check . && $(PY) -m pytest -q

test-slow: ## the tests marked slow (whole sweeps killed and resumed, bench scripts, fresh venvs)
	$(PY) -m pytest -q -m slow

models: ## measure the paper's Table 1 models beside its published sizes
	$(PY) -m dse.models

paper-sizes: ## measure every model row of the paper's Tables 1-3 beside its published size
	$(PY) -m dse.models --tables 1 2 3

sweep-quick: ## the quick width sweep on CIFAR-10, downloaded on first use (DATA=fashion_mnist offline)
	$(PY) -m dse.sweep +space=width budget=quick data=$(or $(DATA),cifar10)

tables: ## every trial and configuration, the paper's Tables 1-7, Figure 9 and a Pareto plot of STUDY=NAME into reports/NAME/
	$(PY) -m dse.report --study $(study) --storage $(STORAGE) --format markdown csv latex

dashboard: ## optuna-dashboard on STUDY's DB with its artifact store (PORT=8080); a missing study: one line
	$(eval MISSING := $(shell $(PY) -W ignore -m dse.sweep --list $(study) --storage '$(STORAGE)' 2>&1 >/dev/null))
	$(if $(MISSING),$(error $(MISSING)))
	$(dir $(PY))optuna-dashboard '$(STORAGE)' --artifact-dir $(ARTIFACTS) --port $(PORT)

deploy-list: ## print STUDY's Pareto front (warns of latencies measured under load)
	$(PY) -m dse.deploy list --study $(study) --storage $(STORAGE)

deploy-measure: ## re-measure the latency of STUDY's Pareto front in one sitting (on a quiet machine)
	$(PY) -m dse.deploy measure --study $(study) --storage $(STORAGE) --front

deploy: ## export STUDY's Pareto front as board bundles into bundles/<STUDY>/
	$(PY) -m dse.deploy export --study $(study) --storage $(STORAGE) --front

deploy-sizes: ## ONNX fp32/int8 sizes and batch-1 latencies of the paper's 06-0.4x shape (untrained)
	$(PY) -m dse.deploy measure "Shallow SqueezeNext-06-0.4x"

bench-trainer: ## benchmark the trainer against pure compute and a DataLoader loop
	$(PY) bench/trainer.py

bench-pruning: ## the open search with and without the pareto pruner on Fashion-MNIST (a GPU or a quiet machine)
	$(PY) bench/pruning.py

bench-pruning-quick: ## the same comparison smaller: under 15 minutes on 2 cores
	$(PY) bench/pruning.py --quick

bench-gpu: ## CUDA-graph steps, fused trials and the paper space's hours on this GPU (bench/gpu.py)
	PYTHON=$(PY) bash bench/gpu.sh

# The wheels bench/gpu.sh installs on a GPU machine without network (pytest: for --tests): the versions here, as wheels
# for CPython 3.11-3.14 on x86-64 Linux (pure-Python ones once; sdist-only ones built here).
GPU_PURE = optuna hydra-core omegaconf antlr4-python3-runtime alembic colorlog mako adabound tqdm typing_extensions \
	packaging pytest pytest-timeout pluggy iniconfig pygments
GPU_BINARY = sqlalchemy pyyaml
pin = $(shell $(PY) -m pip freeze | grep -i -E '^($(subst $(eval) ,|,$(1)))==' | sed 's/ @.*//')
gpu-wheels: ## fetch into wheels/ what bench/gpu.sh installs on a GPU machine without network
	$(PY) -m pip wheel --no-deps -w wheels $(call pin,$(GPU_PURE))
	for v in 3.11 3.12 3.13 3.14; do $(PY) -m pip download --no-deps --only-binary=:all: --python-version $$v \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d wheels $(call pin,$(GPU_BINARY)) || exit 1; done
