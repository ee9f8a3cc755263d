# The two commands of the README: `make demo` and `make test`. Both build .venv from scratch if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
OUT    := out

.PHONY: demo test test-fast test-real-cli lint gate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.cpu: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[cpu]'
	touch $@

$(VENV)/.dev: $(VENV)/.cpu
	$(PIP) install -q -c constraints.txt -e '.[cpu,dev,real,serve,report]'
	touch $@

## demo: fold the shipped model, export it to ONNX and prove parity on onnxruntime
demo: $(VENV)/.cpu
	$(BIN)/bnexport onnx models/net.pt -o $(OUT)/net.onnx

## test: the whole test suite, real torchvision/timm models included (but the real_cli lane),
## on 2 worker processes
## (one torch thread each: two processes with a thread per core would oversubscribe the CPUs)
test: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not real_cli"

## test-real-cli: the slower real models (tests/real/cli_models.py) through `bnexport onnx` and `bnexport check`
test-real-cli: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m real_cli

## test-fast: the inner loop: everything but the real-model and full-dataset tests
test-fast: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not real and not dataset"

## lint: ruff, and import-linter on the layers of docs/architecture.md (pyproject.toml)
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/lint_imports.py

## gate: the CI parity gate on the shipped model (JUnit + Markdown + JSON under out/)
gate: $(VENV)/.cpu
	$(BIN)/bnexport onnx models/net.pt -o $(OUT)/net.onnx --no-check
	$(BIN)/bnexport check $(OUT)/net.onnx --against models/net.pt \
		--json $(OUT)/parity.json --junit $(OUT)/parity.xml --markdown $(OUT)/parity.md

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache .hypothesis
