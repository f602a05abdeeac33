# The two commands of the README: `make serve` and `make test`.
# Everything they need is installed by the targets below, never by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
ARGS ?=

.PHONY: serve test test-rust test-python test-deploy lint runtime venv bench-deps build bench-peers reliability clean

## Fetch ONNX Runtime, build, and run qserver on the shipped default model.
serve: runtime
	cargo build --release -p qserver -p qclient
	./target/release/qserver $(ARGS)

## Run every test: lint, Rust (unit + integration against a real server), the Python
## pipeline, and deploy/ (manifests against the Kubernetes schemas, Dockerfile with hadolint).
test: lint runtime venv
	cargo test --workspace --release
	$(VENV_PY) -m pytest -q train/tests deploy/tests

test-rust: runtime
	cargo test --workspace --release

test-python: venv
	$(VENV_PY) -m pytest -q train/tests

## deploy/ only (its liveness-script test also runs qserver when it is built).
test-deploy: venv
	$(VENV_PY) -m pytest -q deploy/tests

## Formatting and clippy, warnings as errors.
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --release -- -D warnings

runtime:
	./scripts/fetch-onnxruntime.sh

build: runtime
	cargo build --release --workspace

## Compare qserver with PyTorch, Optimum ORT, CTranslate2, llama.cpp (GGUF) and a Python ORT loop on
## the same models and queries; rewrites docs/benchmarks.{md,json,png}. Options: ARGS="--base --queries 60".
bench-peers: runtime venv bench-deps
	cargo build --release -p qserver -p qclient
	$(VENV_PY) bench/peers.py $(ARGS)

## Reliability suite (not part of `make test`: about 3 minutes + the randomised run): load, SIGTERM,
## kill -9, corrupt models, adversarial clients, random calls, bad inputs; on 127.0.0.1 only. Rewrites
## docs/reliability.md. RELIABILITY_FUZZ_SECS (default 600) and RELIABILITY_LOAD_SECS (60) shorten it;
## ARGS="--sections load,catalogue" picks sections. QSERVER_BIN overrides target/release/qserver.
reliability: runtime venv
	cargo build --release -p qserver -p qclient
	$(VENV_PY) scripts/reliability.py $(ARGS)

# The Python environment (pinned): the model pipeline and the deploy/ checks.
venv: $(VENV)/.installed
$(VENV)/.installed: train/requirements.txt deploy/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	$(VENV_PY) -m pip install --quiet -r train/requirements.txt -r deploy/requirements.txt
	touch $@

# The harness's extra peers (bench/requirements.txt: llama-cpp-python, compiled from source by pip,
# minutes on 2 cores); not needed by `make test`.
bench-deps: $(VENV)/.bench-installed
$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" $(VENV_PY) -m pip install --quiet -r bench/requirements.txt
	touch $@

clean:
	cargo clean
	rm -rf $(VENV) .ort
