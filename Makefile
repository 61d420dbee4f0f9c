# Set-up and the two entry points of the README. Everything happens in a local virtual
# environment (.venv); the extension's build directory (build/) is cached between runs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH) -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps .

demo: setup
	$(BIN)/pfkernels eos --out $(OUT)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check pfkernels tests bench

clean:
	rm -rf build $(VENV)
