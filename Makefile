# difflab: `make test` and `make demo` work on a fresh machine (they build .venv themselves).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: install test lint demo bench clean

$(BIN)/difflab: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so nothing below pulls a CUDA build
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	# k-diffusion for the peer cross-checks (tests/interop/test_peer_samplers.py); only its
	# sampling.py is used (difflab.testing.peers), so none of its dependencies
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $(BIN)/difflab

install: $(BIN)/difflab

lint: install
	$(BIN)/ruff check difflab tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q -n 2 --durations=15

demo: install
	$(BIN)/difflab demo --out runs/demo

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/samplers.py

clean:
	rm -rf $(VENV) runs .pytest_cache
