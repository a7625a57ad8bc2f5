# Set-up is part of every target: a fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel, pinned: an unpinned torch makes pip fetch a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/torchrun --nproc-per-node 2 examples/quickstart.py --algorithm local_sgd --period 8

bench: setup
	$(PY) benchmarks/sync_cost.py

lint: setup
	$(PY) -m pip install -q mypy ruff
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy src/localsgd

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
