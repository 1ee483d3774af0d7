# The two commands of the README: `make train` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jaxface-installed

.PHONY: train test test-fast lint setup demo-output

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torch,onnx,detect,wandb]' torch==2.13.0
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m jaxface.train --config configs/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# The quick tier for day-to-day work (a few minutes); CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiprocess" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# Reruns the demo and puts what it prints into README.md (after behaviour changes).
demo-output: $(STAMP)
	$(PY) docs/regenerate_demo_output.py
