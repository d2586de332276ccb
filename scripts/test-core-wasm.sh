#!/usr/bin/env bash
# Runs inflight-core's unit, table and property tests compiled for wasm32-wasip1 — the 32-bit
# target the filter ships for — under Node's built-in WASI as the cargo test runner.
# Needs: rustup (the pinned toolchain) and Node >= 18; installs the wasm target if missing.
# wasip1 aborts on panic, so a failing test stops that test binary with a non-zero exit.
# proptest must be built without its `fork`/`timeout` features (they need a host OS process):
# the workspace declares it with default-features = false, features = ["std", "bit-set"].
set -euo pipefail
cd "$(dirname "$0")/.."
command -v node >/dev/null || { echo "node not found: install Node.js >= 18" >&2; exit 1; }
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
export CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $PWD/scripts/wasi-runner.mjs"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-core-wasm}"
exec cargo test -p inflight-core --target wasm32-wasip1 "$@"
