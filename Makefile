# keygate: build, run and test an API-key auth filter for Envoy.
# `make run` and `make test` install everything they need on a fresh machine, idempotently.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ENVOY := $(VENV)/lib/python3.11/site-packages/envoy/_bin/envoy
WASM_TARGET := wasm32-wasip1
WASM_OUT := target/$(WASM_TARGET)/release/keygate.wasm
ARTIFACT := build/keygate.wasm
# The Envoy dynamic module (Envoy 1.40 exactly): cargo profile `native` (panic = "unwind").
NATIVE_OUT := target/native/libkeygate.so
NATIVE_ARTIFACT := build/libkeygate.so
# Which artifact `make run` and the e2e stacks load: wasm or native.
HOST ?= wasm
PROFILE ?= demo
PYTEST_ARGS ?=

.PHONY: all toolchain wasm-opt-tool tracked-outputs core-cycles deps build build-wasm build-native build-panic-probe cli lint unit e2e e2e-both test run validate clean core-wall keyservice-tools fuzz fuzz-tools soak boundary-check \
	compose-tools compose-check compose-up compose-down compose-test compose-test-live \
	compose-image-tools compose-images compose-fleet-up compose-fleet-down \
	bench bench-envoy bench-core bench-scale bench-ab bench-tools bench-before oci

all: build

# --- set-up -------------------------------------------------------------------------------
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

# Checked on every run, never stamped: a stamp file survives a toolchain update or a new rustup
# home (and, once committed, made fresh clones skip this recipe). The check takes milliseconds.
toolchain:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

# Debian's docker-compose (the static compose checks parse with it) and curl (the curl suite).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
compose-tools:
	@command -v docker-compose >/dev/null && command -v curl >/dev/null || { \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq docker-compose curl >/dev/null; }

# Debian's nginx: the static key service of the key-service tests and `make run PROFILE=keyservice`
# (RUNLEVEL=1: install only, do not start the distribution's nginx service).
keyservice-tools:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
	  $(SUDO) apt-get update -qq && RUNLEVEL=1 $(SUDO) apt-get install -y -qq nginx-light >/dev/null; }

deps: $(VENV)/.installed toolchain compose-tools keyservice-tools

# --- build --------------------------------------------------------------------------------
build: build-wasm build-native

# The module: opt-level z (sha2 kept at 3 by Cargo.toml), the unused callback exports dropped,
# then Binaryen's wasm-opt -Oz (Debian's binaryen, installed here if missing): under issue 18's
# 400 KB. `make build WASM_OPT_LEVEL=3 WASM_OPT=-O3` is about 30% larger and 15-20% cheaper per
# filter (BENCHMARKS.md, issue 18). The opt-level applies to the wasm build only: the CLI, the
# native module and the core benchmarks keep [profile.release]'s 3.
WASM_OPT_LEVEL ?= z
WASM_OPT ?= -Oz
# Binaryen 108 (Debian 12) validates only the features it is told the module uses.
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
	--enable-mutable-globals --enable-multivalue --enable-reference-types

wasm-opt-tool:
	@command -v wasm-opt >/dev/null || { \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq binaryen >/dev/null; }

build-wasm: toolchain wasm-opt-tool
	CARGO_PROFILE_RELEASE_OPT_LEVEL=$(WASM_OPT_LEVEL) cargo build --release --target $(WASM_TARGET) --lib
	@mkdir -p build target && python3 tools/strip_callbacks.py $(WASM_OUT) target/keygate-stripped.wasm src/host/wasm
	wasm-opt $(WASM_OPT) $(WASM_FEATURES) target/keygate-stripped.wasm -o $(ARTIFACT)
	@echo "built $(ARTIFACT) ($$(stat -c %s $(ARTIFACT)) bytes)"

build-native:
	cargo build --profile native --features envoy-module --lib
	@mkdir -p build && cp $(NATIVE_OUT) $(NATIVE_ARTIFACT)
	@echo "built $(NATIVE_ARTIFACT) ($$(stat -c %s $(NATIVE_ARTIFACT)) bytes)"

# A module that panics in every request hook (tests/e2e/test_native_panic.py). Debug profile:
# it unwinds by default and builds fast.
build-panic-probe:
	cargo build --features panic-probe --lib --target-dir target/panic-probe
	@mkdir -p build/panic-probe && cp target/panic-probe/debug/libkeygate.so build/panic-probe/

# The `keygate` command-line tool (native): target/release/keygate.
cli:
	cargo build --release --bin keygate

# --- checks -------------------------------------------------------------------------------
# No build output or Makefile-made file may be tracked: a fresh clone would skip its recipe.
tracked-outputs:
	@python3 tools/check_tracked_outputs.py

# The core reads bottom-up: no import cycle between its modules.
core-cycles:
	@python3 tools/check_core_cycles.py src/core

# The core talks to neither host: no proxy-wasm, no dynamic-module ABI, no FFI.
core-wall:
	@if grep -rnE 'proxy_wasm|envoy_dynamic_module|extern "C"|crate::(adapter|host)' src/core; then \
	  echo "src/core must not use a host API"; exit 1; fi

lint: toolchain core-wall core-cycles tracked-outputs
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) --lib -- -D warnings
	cargo clippy --features panic-probe --lib -- -D warnings
	cargo fmt --manifest-path bench/empty-module/Cargo.toml -- --check
	cargo clippy --manifest-path bench/empty-module/Cargo.toml --target-dir target/empty-module -- -D warnings
	cargo clippy --manifest-path bench/empty-module/Cargo.toml --target-dir target/deny-module --features deny -- -D warnings
	cargo clippy --manifest-path bench/empty-module/Cargo.toml --target-dir target/calls-module --features calls -- -D warnings

unit:
	cargo test

validate: build $(VENV)/.installed
	@for f in envoy/*.yaml; do \
	  case $$f in *compose*) continue;; esac; \
	  $(ENVOY) --mode validate -c $$f --log-level critical >/dev/null 2>.tmp-validate.log \
	    && echo "valid: $$f" || { cat .tmp-validate.log; rm -f .tmp-validate.log; exit 1; }; \
	done; rm -f .tmp-validate.log

# The live compose tests need a Docker engine and its local images: `make compose-test` runs them.
COMPOSE_LIVE_TESTS = tests/e2e/test_compose_live.py tests/e2e/test_compose_fleet.py
E2E_PYTEST = ENVOY_BIN=$(ENVOY) $(PY) -m pytest -q tests/e2e $(foreach t,$(COMPOSE_LIVE_TESTS),--ignore=$(t)) $(PYTEST_ARGS)

# The whole suite against one host (HOST=wasm|native); `make test` runs it against both.
e2e: build build-panic-probe cli $(VENV)/.installed compose-tools keyservice-tools
	KEYGATE_HOST=$(HOST) $(E2E_PYTEST)

e2e-both: build build-panic-probe cli $(VENV)/.installed compose-tools keyservice-tools
	KEYGATE_HOST=wasm $(E2E_PYTEST)
	KEYGATE_HOST=native $(E2E_PYTEST)

# The boundary linter on every shipped config, and on the keygate config envoy/hot-reload.yaml
# discovers (ECDS): any warning a file does not accept fails.
boundary-check: cli
	@target/release/keygate config check --strict envoy/*.yaml

test: lint unit validate boundary-check e2e-both compose-test

# --- fuzzing (not part of `make test`) ------------------------------------------------------
# `make fuzz` runs every cargo-fuzz target for FUZZ_SECONDS each, one after the other, as one
# libFuzzer process (one core). New inputs go to fuzz/work/<target> (ignored by git); the
# committed seeds in fuzz/corpus/<target> are only read. A crash stops the run and leaves the
# input in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= credential config keyset
fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

fuzz: fuzz-tools
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$target; \
	  dict=fuzz/$$target.dict; [ -f $$dict ] || dict=fuzz/json.dict; \
	  echo "== fuzz $$target for $(FUZZ_SECONDS)s (dictionary $$dict)"; \
	  cargo +nightly fuzz run -O -a $$target fuzz/work/$$target fuzz/corpus/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -dict=$$dict -print_final_stats=1 || exit 1; \
	done

# --- soak (not part of `make test`: about 20 minutes here) -----------------------------------
# 1,000,000 mixed valid/invalid requests through Envoy on envoy/demo.yaml with wrk (Debian
# package), Envoy's memory sampled every 100,000. SOAK_ARGS="--requests 200000" for a short one.
SOAK_ARGS ?=
soak: build $(VENV)/.installed
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	ENVOY_BIN=$(ENVOY) $(PY) tests/soak.py $(SOAK_ARGS)

# --- run ----------------------------------------------------------------------------------
run: build $(VENV)/.installed keyservice-tools
	@KEYGATE_HOST=$(HOST) ENVOY_BIN=$(ENVOY) $(PY) tests/run_demo.py envoy/$(PROFILE).yaml

# --- docker compose -------------------------------------------------------------------------
# envoy/docker-compose.yaml runs envoy/$(KEYGATE_CONFIG) (default demo.yaml) in the official Envoy
# image with build/keygate.wasm. `docker compose` (v2) when installed, else docker-compose (v1).
# KEYGATE_IMAGES=local swaps in the images `make compose-images` builds here (no registry needed);
# `make compose-test` always runs those.
KEYGATE_IMAGES ?= official
COMPOSE_CMD = $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
LOCAL_OVERRIDE = $(if $(filter local,$(KEYGATE_IMAGES)),-f envoy/compose/$(1))
COMPOSE = $(COMPOSE_CMD) -p keygate -f envoy/docker-compose.yaml $(call LOCAL_OVERRIDE,local-images.yaml)
COMPOSE_FLEET = $(COMPOSE_CMD) -p keygate-fleet -f envoy/compose/fleet.yaml \
	$(call LOCAL_OVERRIDE,fleet-local-images.yaml)
COMPOSE_LOCAL_IMAGES = $(if $(filter local,$(KEYGATE_IMAGES)),compose-images)
DOCKER_ENGINE_CHECK = docker info >/dev/null 2>&1
NO_ENGINE = needs a running Docker engine, and 'docker info' got no answer
export KEYGATE_DEBIAN_SUITE := $(shell . /etc/os-release 2>/dev/null && echo $$VERSION_CODENAME)

# Debian's debootstrap makes the root filesystem of the local images.
compose-image-tools:
	@command -v debootstrap >/dev/null || { \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq debootstrap >/dev/null; }

# keygate-local/{envoy,python,nginx} from this machine's packages and the tests' Envoy binary,
# rebuilt only when their inputs change (docker/build-images.sh).
compose-images: $(VENV)/.installed compose-image-tools
	@$(DOCKER_ENGINE_CHECK) || { echo "make compose-images: $(NO_ENGINE)." >&2; exit 1; }
	docker/build-images.sh $(ENVOY)

# compose-up starts from scratch: switching KEYGATE_CONFIG then needs no container recreation,
# which docker-compose v1 gets wrong on Docker Engine 25+ (KeyError 'ContainerConfig', docker/compose#11742).
compose-up:
	@$(DOCKER_ENGINE_CHECK) || { echo "make compose-up: $(NO_ENGINE)." >&2; exit 1; }
	@$(MAKE) --no-print-directory build $(COMPOSE_LOCAL_IMAGES)
	@$(COMPOSE) down >/dev/null 2>&1 || true
	$(COMPOSE) up -d
	@echo "keygate ($${KEYGATE_CONFIG:-demo.yaml}) is starting on http://localhost:10000" \
	  "(admin: http://localhost:9901/stats?filter=keygate); logs: $(COMPOSE) logs -f envoy"

compose-down:
	@$(DOCKER_ENGINE_CHECK) || { echo "make compose-down: $(NO_ENGINE)." >&2; exit 1; }
	$(COMPOSE) down

# Two Envoys sharing one key service (envoy/compose/fleet.yaml); each on its own container address.
compose-fleet-up:
	@$(DOCKER_ENGINE_CHECK) || { echo "make compose-fleet-up: $(NO_ENGINE)." >&2; exit 1; }
	@$(MAKE) --no-print-directory build $(COMPOSE_LOCAL_IMAGES)
	@$(COMPOSE_FLEET) down >/dev/null 2>&1 || true
	$(COMPOSE_FLEET) up -d
	@for s in envoy-a envoy-b; do \
	  ip=$$(docker inspect --format '{{ (index .NetworkSettings.Networks "keygate-fleet_front").IPAddress }}' \
	    $$($(COMPOSE_FLEET) ps -q $$s)); \
	  echo "$$s: http://$$ip:10000 (admin http://$$ip:9901)"; done

compose-fleet-down:
	@$(DOCKER_ENGINE_CHECK) || { echo "make compose-fleet-down: $(NO_ENGINE)." >&2; exit 1; }
	$(COMPOSE_FLEET) down

# Live, with the local images: the README's curl suite against envoy/docker-compose.yaml on
# demo.yaml (ports 10000/9901), then the fleet tests. Any failure fails `make test`.
# Without a Docker engine it says so and succeeds: `make test` checks the compose files statically.
compose-test:
	@if $(DOCKER_ENGINE_CHECK); then $(MAKE) --no-print-directory compose-test-live; else \
	  echo "make compose-test: SKIPPED - it $(NO_ENGINE) on this machine."; \
	  echo "  The compose file is still checked statically by 'make test' (make compose-check)."; fi

compose-test-live: build compose-tools compose-images
	@start=$$SECONDS; ENVOY_BIN=$(ENVOY) $(PY) -m pytest -q $(COMPOSE_LIVE_TESTS) $(PYTEST_ARGS); \
	  status=$$?; echo "compose-test: live compose tests took $$((SECONDS - start)) s"; exit $$status

# Static checks of the compose stack (no Docker engine needed); part of `make e2e`/`make test`.
compose-check: build $(VENV)/.installed compose-tools
	ENVOY_BIN=$(ENVOY) $(PY) -m pytest -q tests/e2e/test_compose_static.py $(PYTEST_ARGS)

# --- OCI image of the wasm module (Istio WasmPlugin, Envoy Gateway; docs/kubernetes/) ------
# `FROM scratch` plus one COPY: the module at /plugin.wasm in a single layer, which is what both
# expect. The context is a scratch directory holding only that file, and nothing is pulled.
# The classic builder (DOCKER_BUILDKIT=0) needs no buildx plugin and no BuildKit frontend image.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
OCI_IMAGE ?= keygate-wasm:$(VERSION)
oci: build
	@$(DOCKER_ENGINE_CHECK) || { echo "make oci: $(NO_ENGINE)." >&2; exit 1; }
	@rm -rf .tmp/oci && mkdir -p .tmp/oci
	cp $(ARTIFACT) .tmp/oci/plugin.wasm
	DOCKER_BUILDKIT=0 docker build --quiet -t $(OCI_IMAGE) -f oci/Dockerfile .tmp/oci
	@echo "built $(OCI_IMAGE): /plugin.wasm ($$(stat -c %s $(ARTIFACT)) bytes); docker tag + docker push it to your registry"

# --- benchmarks (BENCHMARKS.md) --------------------------------------------------------------
# make bench: every contender of envoy/bench.yaml side by side in one Envoy, then the core
# microbenchmarks, then the key-set scale table (bench-scale). Timed numbers are printed, never
# asserted. BEFORE=<git rev> adds a listener
# with that revision's keygate.wasm; keygate-native (build/libkeygate.so) always runs; BENCH_100K=1 adds keygate with 100,000 keys, inline and from
# a key service (full sync through shared data);
# BENCH_ROUNDS / BENCH_SECONDS change the run length.
BENCH_ROUNDS ?= 5
BENCH_SECONDS ?= 4
BEFORE ?=
BENCH_100K ?=
BENCH_EXTRA = --extra empty --extra native $(if $(BEFORE),--extra before) $(if $(BENCH_100K),--extra 100k)

bench-tools:
	@command -v wrk >/dev/null && command -v taskset >/dev/null || { \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk util-linux >/dev/null; }

# The Rust proxy-wasm filter that does nothing: the floor of any wasm filter.
build/bench-empty.wasm: bench/empty-filter/src/lib.rs bench/empty-filter/Cargo.toml | toolchain
	cargo build --release --target $(WASM_TARGET) --manifest-path bench/empty-filter/Cargo.toml \
	  --target-dir target/empty-filter
	@mkdir -p build && cp target/empty-filter/$(WASM_TARGET)/release/empty_filter.wasm $@

# The same filter answering every request with keygate's unknown-key 401 (SDK send_http_response):
# the floor of a wasm filter's local reply, for the 401 path (`bench/ab.py --unknown`).
build/bench-deny.wasm: bench/empty-filter/src/lib.rs bench/empty-filter/Cargo.toml | toolchain
	cargo build --release --target $(WASM_TARGET) --manifest-path bench/empty-filter/Cargo.toml \
	  --features deny --target-dir target/deny-filter
	@mkdir -p build && cp target/deny-filter/$(WASM_TARGET)/release/empty_filter.wasm $@

# The Envoy dynamic module that does nothing (bench/empty-module, a crate of its own): the floor
# of any dynamic-module filter, under keygate-native. Bench only: not part of `make build`.
build/libbench_empty.so: bench/empty-module/src/lib.rs bench/empty-module/Cargo.toml
	cargo build --release --manifest-path bench/empty-module/Cargo.toml --target-dir target/empty-module
	@mkdir -p build && cp target/empty-module/release/libempty_module.so $@

# The same module answering every request with keygate's unknown-key 401 (http_send_response):
# the floor of a dynamic module's local reply, for keygate-native's 401 path.
build/libbench_deny.so: bench/empty-module/src/lib.rs bench/empty-module/Cargo.toml
	cargo build --release --manifest-path bench/empty-module/Cargo.toml --features deny \
	  --target-dir target/deny-module
	@mkdir -p build && cp target/deny-module/release/libempty_module.so $@

# The same module making keygate-native's callbacks of a valid key with fixed values, nothing
# else (bench/ab.py only): what the callbacks cost Envoy apart from keygate's code.
build/libbench_calls.so: bench/empty-module/src/lib.rs bench/empty-module/Cargo.toml
	cargo build --release --manifest-path bench/empty-module/Cargo.toml --features calls \
	  --target-dir target/calls-module
	@mkdir -p build && cp target/calls-module/release/libempty_module.so $@

BENCH_FLOORS := build/bench-empty.wasm build/bench-deny.wasm build/libbench_empty.so build/libbench_deny.so

# BEFORE's module, built by that revision's own `make build` in a scratch tree.
bench-before:
	@test -n "$(BEFORE)" || { echo "set BEFORE=<git revision>"; exit 1; }
	# target/ too: the build writes its stripped module there, and the scratch tree has none.
	rm -rf .tmp/before && mkdir -p .tmp/before/target && git archive $(BEFORE) | tar -x -C .tmp/before
	CARGO_TARGET_DIR=$(CURDIR)/target/before $(MAKE) -C .tmp/before --no-print-directory build \
	  WASM_OUT=$(CURDIR)/target/before/$(WASM_TARGET)/release/keygate.wasm \
	  NATIVE_OUT=$(CURDIR)/target/before/native/libkeygate.so
	cp .tmp/before/build/keygate.wasm build/keygate-before.wasm

bench-envoy: build $(BENCH_FLOORS) bench-tools $(VENV)/.installed $(if $(BEFORE),bench-before)
	ENVOY_BIN=$(ENVOY) $(PY) bench/run.py --rounds $(BENCH_ROUNDS) --seconds $(BENCH_SECONDS) $(BENCH_EXTRA)

# An example rather than a `cargo bench` target: cargo builds the CLI binary for benches too,
# with a different panic strategy but the same library file name (cargo issue 6313).
bench-core:
	cargo run --release --example bench_core

# The key-set scale table (issue 14, bench/keyset_scale.py): keys from a key service in full mode
# and lookup on miss, for keygate.wasm and keygate-native, at BENCH_SCALE_KEYS keys (the first size
# is the baseline row). About 10 minutes at the default sizes; BENCH_SCALE_KEYS=1000,10000 for a
# quick one.
BENCH_SCALE_KEYS ?= 1000,10000,100000,1000000
bench-scale: build bench-tools keyservice-tools $(VENV)/.installed
	ENVOY_BIN=$(ENVOY) $(PY) bench/keyset_scale.py --keys $(BENCH_SCALE_KEYS)

bench: bench-envoy bench-core bench-scale

# Amplified A/B of two builds (bench/ab.py): make bench-ab A=build/keygate-before.wasm
A ?= build/keygate-before.wasm
bench-ab: build $(BENCH_FLOORS) build/libbench_calls.so bench-tools $(VENV)/.installed
	ENVOY_BIN=$(ENVOY) $(PY) bench/ab.py empty=build/bench-empty.wasm empty_module=build/libbench_empty.so \
	  a=$(A) b=$(ARTIFACT)

clean:
	cargo clean
	rm -rf build .tmp
