# Set-up and everyday commands. `make demo` and `make test` each install what they need.
#
# TORCH: the torch requirement installed when the environment has none. The default pins a
# release; for a CPU-only machine elsewhere use
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cpu" demo
# and GPU users can install their CUDA build of torch into .venv first (it is kept).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/featcache demo --out demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo .pytest_cache
