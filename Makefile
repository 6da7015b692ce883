# The only two set-up commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_compress.demos.main

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not ddp"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Each script writes its own section; RESULTS.md is their concatenation (about 55 minutes in all).
bench: $(STAMP)
	$(PY) benchmarks/pruning.py --out benchmarks/results/pruning.md
	$(PY) benchmarks/sparsity.py --out benchmarks/results/sparsity.md
	$(PY) benchmarks/structured.py --out benchmarks/results/structured.md
	$(PY) benchmarks/quantization.py --out benchmarks/results/quantization.md
	$(PY) benchmarks/distillation.py --out benchmarks/results/distillation.md
	cat benchmarks/results/pruning.md benchmarks/results/sparsity.md benchmarks/results/structured.md \
		benchmarks/results/quantization.md benchmarks/results/distillation.md > benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) build *.egg-info lightning_logs .pytest_cache
