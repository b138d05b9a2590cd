# multicluster-scheduler: every entry point a user or CI needs.
# `make demo` and `make test` install what they need (venv, tools) on a fresh machine.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLUSTERS ?= c1,c2
NODES ?= 3
export MCS_LOCAL_DIR ?= $(CURDIR)/.local

.PHONY: help venv tools podman up down status demo test unit integration e2e lint clean bench chaos namespaces image compose-up compose-down

help:
	@echo "make demo    - build tools if needed, start the local environment and show it"
	@echo "make test    - lint, then unit, integration and end-to-end tests (starts its own environment)"
	@echo "make tools   - build the control-plane tools into ~/.cache/multicluster-scheduler/tools"
	@echo "make up      - start clusters ($(CLUSTERS)), NATS (NATS_NODES=3: a cluster), Jaeger and the four services (SERVICES=0: without them)"
	@echo "make down    - stop everything make up started"
	@echo "make status  - show what runs and where"
	@echo "make bench   - benchmark (BENCH_PODS=200 for a quick run); results in .local/bench/"
	@echo "make chaos   - faults while pods are placed and deleted (CHAOS_ROUNDS=3 for longer); docs/reliability.md"
	@echo "make namespaces - 2000 namespaces with an elected pod each on the running environment, a probe placed meanwhile"
	@echo "make image   - build the image from the Dockerfile with podman (root; no registry needed)"
	@echo "make compose-up - docker-compose.yml through podman on the running environment; make compose-down removes it"

$(VENV)/.installed: pyproject.toml
	@echo "==> Python environment in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

tools: venv
	@echo "==> Control-plane tools (built once, then cached)"
	@$(PY) -m localenv tools

# The image and compose tests need podman (Debian's, run as root); installed from Debian when it is
# missing and this is root with apt-get, else those tests are skipped and say why.
PODMAN_PACKAGES := podman debootstrap runc
podman:
	@if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "==> $(PODMAN_PACKAGES) from Debian with apt-get (for the image and compose tests; about a minute)"; \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PODMAN_PACKAGES); } >/dev/null 2>&1 \
	      || echo "    apt-get failed: the image and compose tests will be skipped"; \
	  else \
	    echo "==> podman is missing and cannot be installed here (root with apt-get only): the image and compose tests will be skipped"; \
	  fi; \
	fi

up: tools
	@$(PY) -m localenv up --clusters $(CLUSTERS) --nodes $(NODES)

down: venv
	@$(PY) -m localenv down

status: venv
	@$(PY) -m localenv status

demo: up
	@echo "==> Admiralty's getting-started scenario: 10 elected nginx pods from c1 to c1 and c2"
	@$(PY) -m localenv demo

bench: tools
	@echo "==> benchmark: BENCH_PODS=$${BENCH_PODS:-1000} pods, baseline, the pipeline, the baseline again, then 2 and 3 processes of each stage (not with BENCH_SCALING=0)"
	@$(PY) -m localenv bench

image: venv podman
	@echo "==> the project's image with podman, from the Dockerfile (a Debian stand-in for python:3.11-slim made once)"
	@$(PY) -m localenv image

compose-up: tools podman
	@echo "==> docker-compose.yml through podman on the running environment (make up first; replaces its services)"
	@$(PY) -m localenv compose up

compose-down: venv
	@$(PY) -m localenv compose down

namespaces: tools
	@echo "==> $${NAMESPACES_COUNT:-2000} namespaces with an elected pod each, on the running environment (make up first; a few minutes)"
	@$(PY) -m localenv namespaces

chaos: tools
	@echo "==> chaos: CHAOS_ROUNDS=$${CHAOS_ROUNDS:-1} round(s) of faults while pods are placed and deleted (about 6 minutes a round)"
	@$(PY) -m localenv chaos

lint: venv
	@echo "==> ruff and mypy"
	@$(VENV)/bin/ruff check libs services tests
	@$(VENV)/bin/mypy

unit: venv
	@$(VENV)/bin/pytest -q tests/unit

integration: tools
	@$(VENV)/bin/pytest -q tests/integration

e2e: tools
	@$(VENV)/bin/pytest -q tests/e2e

test: lint tools podman
	@echo "==> tests (the integration and e2e layers start their own local environment)"
	@$(VENV)/bin/pytest -q -ra tests

clean: down
	rm -rf .local
