#!/usr/bin/env bash
# The long chaos run in real Envoy (≥ 100k requests; several minutes). Prints the figures:
# requests, client disconnects, upstream resets and 5xx, replica kills, violations, hung, leaked.
# Tune with CHAOS_REQUESTS (100000), CHAOS_CLIENTS (64), CHAOS_SEED, CHAOS_DISCONNECT_PCT (10),
# CHAOS_RESET_PCT (5), CHAOS_ERROR_PCT (5), CHAOS_KILL_AT_PCT (40).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-chaos}"
exec cargo test -p inflight-host-tests --test chaos_envoy chaos_long -- --ignored --nocapture
