# fashion-tagger: `make run` and `make test` set everything up by themselves on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch==2.14.1 / torchvision==0.29.1 come from this machine's wheel cache through constraints.txt.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

export FASHION_TAGGER_HOME ?= $(CURDIR)/.home
export PYTHONUNBUFFERED := 1

.PHONY: help venv run up down test test-fast lint lint-deploy format bench bench-quality clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing fashion-tagger and its pinned dependencies into $(VENV) (first time: a few minutes)"
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) -e '.[airflow,dev]'
	@touch $@

venv: $(STAMP)  ## build or update .venv (idempotent; quick when nothing changed)

run: $(STAMP)  ## run the whole workflow through the Airflow DAG (dag.test) on the embedded default
	$(PY) scripts/run_dag.py --preset demo

up: $(STAMP)  ## serve the Airflow UI (:8080) and the MLflow UI (:5000) over the same stores, in the background
	VENV_BIN=$(CURDIR)/$(VENV)/bin scripts/up.sh

down:  ## stop what `make up` started
	scripts/down.sh

test: $(STAMP)  ## run the whole test suite (installs PostgreSQL and Redis when missing)
	scripts/ensure_services.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(MAKE) --no-print-directory lint-deploy
	$(VENV)/bin/pytest --durations=25

test-fast: $(STAMP)  ## tests without the slow tier
	$(VENV)/bin/pytest -m "not slow and not services and not browser"

lint: $(STAMP)  ## ruff, the per-subpackage import contracts (lint-imports) and mypy (see pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# hadolint fails on any finding of level info or above; compose-lint on any medium or higher one that
# .compose-lint.yml does not exclude with a reason. --no-env: grade the committed file, not a local .env.
lint-deploy: $(STAMP)  ## hadolint on docker/*.Dockerfile, compose-lint on docker-compose.yaml
	$(VENV)/bin/hadolint --failure-threshold info docker/*.Dockerfile
	$(VENV)/bin/compose-lint check --quiet --no-env --strict-config --config .compose-lint.yml --fail-on medium \
		docker-compose.yaml

format: $(STAMP)  ## ruff fix + format
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)  ## the CPU benchmarks behind docs/performance.md (several minutes; GPU: bash benchmarks/gpu.sh)
	$(PY) benchmarks/synth.py --rows 2000 --full-rows 3
	$(PY) benchmarks/prepare.py --generated 24 --rounds 3
	$(PY) benchmarks/loader.py --images 48 --rounds 3 --workers 0
	$(PY) benchmarks/train_throughput.py --backbone tinynet_e --width 48 --height 64 --batch-size 64 --threads 1 --steps 5 --rounds 3
	$(PY) benchmarks/inference.py --backbone efficientnet_b0 --batch 16 --threads 1 --rounds 10

bench-quality: $(STAMP)  ## recipes compared on the real images-small at an equal budget (about 15 min; docs/quality.md)
	$(PY) benchmarks/quality.py --data $${FASHION_TAGGER_REAL_DATA:-../shared/data/fashion-real} --budget-s 150

clean:  ## remove the embedded home (data, runs, MLflow store); keeps .venv
	rm -rf .home
