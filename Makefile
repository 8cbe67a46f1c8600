# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test docs-check lint bench images

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m scripts.demo

test: setup
	$(PY) -m pytest -q

# Every ```bash block of README.md and docs/ on small data (part of `make test` too);
# FEDPSG_DOCS_DEPLOY=1 also runs the `fedpsg deploy local` commands (minutes each)
docs-check: setup
	$(PY) -m pytest tests/test_docs_commands.py -q -rs

lint: setup
	$(VENV)/bin/ruff check .

# The compose federation's images without a registry: debootstrap base + host-side wheelhouse
# (root, docker.io and debootstrap; cached: unchanged inputs are not rebuilt)
images: setup
	$(VENV)/bin/fedpsg images
