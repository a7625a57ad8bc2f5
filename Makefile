# Set-up is part of every target: a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel, pinned: an unpinned torch makes pip fetch a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo quickstart bench bench-docs lint package clean

# The suite tests the optional integrations (Trainer, accelerate, Lightning, trackers) rather
# than skipping them, so their extras come with it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,text,lightning,trackers]'
	touch $@

setup: $(VENV)/.installed

# Two workers (pytest-xdist): most tests wait on worker processes, sockets and launches, so
# two run side by side on two cores; `make test WORKERS=0` (or `pytest -q` alone) runs the
# same suite serially.
WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup

# The main job: the demo study (30 runs, MNIST-1D) and its report.
demo: setup
	$(VENV)/bin/localsgd study studies/demo.toml --out studies_out/demo
	$(VENV)/bin/localsgd report studies_out/demo
	@echo "Report: studies_out/demo/report/report.html (also report.md, results.xlsx)"

# The quickstart example: 2 worker processes, local SGD (H = 8).
quickstart: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 examples/quickstart.py --algorithm local_sgd --period 8

bench: setup
	$(PY) benchmarks/sync_cost.py

# docs/benchmarks.md is generated from benchmarks/results/*.json (each benchmark writes its own).
bench-docs: setup
	$(PY) benchmarks/render.py

lint: setup
	$(PY) -m pip install -q mypy ruff
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy src/localsgd

# The package as users get it: wheel and sdist built and checked (twine --strict), the wheel
# installed in a new virtual environment without extras and with [text], and the README's
# example and a study's dry run executed from outside the repository (.ci/package); the
# checked wheel and sdist are left in dist/.
package: setup
	$(PY) -m pip install -q 'build>=1.2' 'twine>=6.1'
	PYTHON=$(PYTHON) TORCH_PIN="$(TORCH_PIN)" DIST_DIR=$(CURDIR)/dist .ci/package $(PY)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
