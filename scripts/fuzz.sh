#!/usr/bin/env bash
# Fuzzes inflight-core's parsers and matchers with cargo-fuzz (libFuzzer).
#   scripts/fuzz.sh --quick   # ~10 s per target (the test command)
#   scripts/fuzz.sh [SECS]    # longer: SECS per target (default 300)
# cargo-fuzz needs nightly compiler flags; only stable Rust is pinned here, so the build runs
# with RUSTC_BOOTSTRAP=1 (stable rustc accepting -Z flags). Needs `cargo install cargo-fuzz`.
# A crash leaves its input in fuzz/artifacts/<target>/; turn it into a unit test in core.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=300
if [[ "${1:-}" == "--quick" ]]; then secs=10; elif [[ -n "${1:-}" ]]; then secs="$1"; fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
for t in config_parse revision_match state_decode; do
  mkdir -p "corpus/$t"
  echo "== fuzz $t for ${secs}s"
  log="$(mktemp)"
  rc=0
  cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E "(DONE|stat::number_of_executed_units|SUMMARY|Test unit written|panicked)" "$log" || true
  if [[ $rc -ne 0 ]]; then
    tail -n 40 "$log"
    echo "fuzz target $t failed (rc $rc); reproducer in fuzz/artifacts/$t/" >&2
    exit "$rc"
  fi
  rm -f "$log"
done
