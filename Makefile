# Two commands set up and check a fresh machine: `make test`, then `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow lint format type pytest demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Torch first, pinned: 2.13.0 resolves to the CPU wheel on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

type: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint type pytest

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The main job end to end, on a budget this CPU finishes in a few minutes.
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) train.py --env BreakoutNoFrameskip-v4 --core rims --total-timesteps 16384 --run-dir runs/demo
	$(PY) evaluate.py runs/demo --shifts all --episodes 4 --out runs/demo/eval
	$(PY) visualize.py runs/demo --episodes 1 --max-steps 1000 --out runs/demo/videos

bench: $(STAMP)
	$(PY) benchmarks/core_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
