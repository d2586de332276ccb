# inflight — task runner. `make demo` runs the local KServe autoscaling demo; `make test` runs
# every test (setup included). Both install what they need first (idempotent).
SHELL := /bin/bash
WASM := target/wasm32-wasip1/wasm/inflight_filter.wasm
# `make demo GATEWAYS=3`: the demo through a fleet of three gateways behind an L4 Envoy.
GATEWAYS ?= 1

.PHONY: setup build-wasm build test test-rust test-core-wasm test-fuzz test-compose compose lint fmt demo bench chaos-long fuzz clean

setup:
	scripts/setup.sh

build-wasm:
	cargo build -p inflight-filter --target wasm32-wasip1 --profile wasm
	@ls -l $(WASM)

build: setup build-wasm
	cargo build --workspace --release

# Every test: core (native and wasm32), emulated host, real Envoy (limits, autoscaling, chaos,
# VM crash, reload, hostile input), predictor, CLI (render, local stack, demo), short fuzzing,
# the docker-compose stack with Prometheus (needs a Docker engine; after test-rust, whose debug
# predictor it reuses).
# --keep-going: one failing part does not hide the results of the others (the exit code still fails).
test: setup
	$(MAKE) --keep-going test-rust test-core-wasm test-fuzz test-compose

test-rust:
	LIBTORCH="$$(scripts/setup-torch.sh --print-libtorch)" cargo test --workspace --no-fail-fast

test-core-wasm:
	scripts/test-core-wasm.sh

test-fuzz:
	scripts/fuzz.sh --quick

test-compose:
	scripts/test-compose.sh

# The compose stack's images (release predictor), on BASE_IMAGE if set, else on the local base
# scripts/base-image.sh makes from Debian's packages (no registry needed). Then:
#   docker compose -f envoy/docker-compose.yaml -p inflight up -d --scale predictor=2
COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
compose: setup
	scripts/compose-context.sh
	BASE_IMAGE="$${BASE_IMAGE:-$$(scripts/base-image.sh | tail -1)}" $(COMPOSE) -f envoy/docker-compose.yaml build

# Longer runs (not part of `make test`).
chaos-long: setup
	scripts/chaos-long.sh

fuzz: setup
	scripts/fuzz.sh

lint:
	cargo fmt --all -- --check
	LIBTORCH="$$(scripts/setup-torch.sh --print-libtorch)" cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p inflight-core -p inflight-filter --target wasm32-wasip1 -- -D warnings

fmt:
	cargo fmt --all

demo: setup build-wasm
	LIBTORCH="$$(scripts/setup-torch.sh --print-libtorch)" cargo build --release -p inflight -p inflight-predictor
	target/release/inflight up --demo --gateways $(GATEWAYS)

bench: setup build-wasm
	cargo run --release -p inflight -- bench

clean:
	cargo clean
