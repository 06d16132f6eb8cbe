# sod-kernels: install, test, demo, bench.  Every target that runs code installs first when needed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install test demo bench codegen clean

install: $(STAMP)

# torch is installed first, pinned, so that pip takes the local CPU build instead of a multi-GB CUDA
# build; the package itself only asks for a range that this version satisfies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev,bench,trainer]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $${PYTEST_WORKERS:-auto} tests

demo: install
	$(PY) -m trainer demo

bench: install
	$(PY) -m benchmarks --quick

codegen: install
	$(PY) -m benchmarks.codegen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
