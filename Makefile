# inflight — task runner. `make demo` runs the local KServe autoscaling demo; `make test` runs
# every test (setup included). Both install what they need first (idempotent).
SHELL := /bin/bash
export LIBTORCH = $(shell [ -x .venv-torch/bin/python ] && scripts/setup-torch.sh --print-libtorch)
WASM := target/wasm32-wasip1/wasm/inflight_filter.wasm

.PHONY: setup build-wasm build test test-rust test-core-wasm lint fmt demo bench clean

setup:
	scripts/setup.sh

build-wasm:
	cargo build -p inflight-filter --target wasm32-wasip1 --profile wasm
	@ls -l $(WASM)

build: setup build-wasm
	cargo build --workspace --release

# Every test: core (native and wasm32), emulated host, real Envoy, predictor, CLI.
test: setup
	$(MAKE) test-rust test-core-wasm

test-rust:
	LIBTORCH="$$(scripts/setup-torch.sh --print-libtorch)" cargo test --workspace --no-fail-fast

test-core-wasm:
	scripts/test-core-wasm.sh

lint:
	cargo fmt --all -- --check
	LIBTORCH="$$(scripts/setup-torch.sh --print-libtorch)" cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p inflight-core -p inflight-filter --target wasm32-wasip1 -- -D warnings

fmt:
	cargo fmt --all

demo: setup build-wasm
	LIBTORCH="$$(scripts/setup-torch.sh --print-libtorch)" cargo build --release -p inflight -p inflight-predictor
	target/release/inflight up --demo

bench: setup build-wasm
	cargo run --release -p inflight -- bench

clean:
	cargo clean
