# `make demo` sets everything up and runs the main job; `make test` sets everything up
# and runs the tests. Both create .venv with the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test lint format clean

$(STAMP): requirements/ci.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST from Debian's package where apt is available (no download at run time).
data:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; the data commands will say how to get it"; \
	else \
		echo "note: Fashion-MNIST not found at $(FASHION_MNIST): install the Debian package dataset-fashion-mnist"; \
	fi

demo: setup
	$(VENV)/bin/layermerge demo --run-dir runs/demo

test: setup
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check src tests benchmarks

lint:
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format:
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
