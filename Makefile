# keygate: build, run and test an API-key auth filter for Envoy.
# `make run` and `make test` install everything they need on a fresh machine, idempotently.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ENVOY := $(VENV)/lib/python3.11/site-packages/envoy/_bin/envoy
WASM_TARGET := wasm32-wasip1
WASM_OUT := target/$(WASM_TARGET)/release/keygate.wasm
ARTIFACT := build/keygate.wasm
PROFILE ?= demo
PYTEST_ARGS ?=

.PHONY: all deps build lint unit e2e test run validate clean core-wall

all: build

# --- set-up -------------------------------------------------------------------------------
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

.wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@touch $@

deps: $(VENV)/.installed .wasm-target

# --- build --------------------------------------------------------------------------------
build: .wasm-target
	cargo build --release --target $(WASM_TARGET) --lib
	@mkdir -p build && cp $(WASM_OUT) $(ARTIFACT)
	@echo "built $(ARTIFACT) ($$(stat -c %s $(ARTIFACT)) bytes)"

# --- checks -------------------------------------------------------------------------------
core-wall:
	@if grep -rn 'proxy_wasm' src/core; then echo "src/core must not use proxy_wasm"; exit 1; fi

lint: .wasm-target core-wall
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) --lib -- -D warnings

unit:
	cargo test

validate: build $(VENV)/.installed
	@for f in envoy/*.yaml; do \
	  case $$f in *compose*) continue;; esac; \
	  $(ENVOY) --mode validate -c $$f --log-level critical >/dev/null 2>.tmp-validate.log \
	    && echo "valid: $$f" || { cat .tmp-validate.log; rm -f .tmp-validate.log; exit 1; }; \
	done; rm -f .tmp-validate.log

e2e: build $(VENV)/.installed
	ENVOY_BIN=$(ENVOY) $(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

test: lint unit validate e2e

# --- run ----------------------------------------------------------------------------------
run: build $(VENV)/.installed
	@ENVOY_BIN=$(ENVOY) $(PY) tests/run_demo.py envoy/$(PROFILE).yaml

clean:
	cargo clean
	rm -rf build .tmp .wasm-target
