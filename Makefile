# The two commands of the README: `make serve` and `make test`.
# Everything they need is installed by the targets below, never by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
ARGS ?=

.PHONY: serve test test-rust test-python runtime venv build bench-peers clean

## Fetch ONNX Runtime, build, and run qserver on the shipped default model.
serve: runtime
	cargo build --release -p qserver -p qclient
	./target/release/qserver $(ARGS)

## Run every test: Rust (unit + integration against a real server) and the Python pipeline.
test: runtime venv
	cargo test --workspace --release
	$(VENV_PY) -m pytest -q train/tests

test-rust: runtime
	cargo test --workspace --release

test-python: venv
	$(VENV_PY) -m pytest -q train/tests

runtime:
	./scripts/fetch-onnxruntime.sh

build: runtime
	cargo build --release --workspace

## Compare qserver with PyTorch, Optimum ORT, CTranslate2 and a Python ORT loop on the same
## models and queries; rewrites docs/benchmarks.{md,json,png}. Options: ARGS="--base --queries 60".
bench-peers: runtime venv
	cargo build --release -p qserver -p qclient
	$(VENV_PY) bench/peers.py $(ARGS)

# The model pipeline's Python environment (pinned).
venv: $(VENV)/.installed
$(VENV)/.installed: train/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	$(VENV_PY) -m pip install --quiet -r train/requirements.txt
	touch $@

clean:
	cargo clean
	rm -rf $(VENV) .ort
