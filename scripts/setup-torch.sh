#!/usr/bin/env bash
# Installs libtorch for the predictor (crate `inflight-predictor`, built with tch 0.26) into
# <repo>/.venv-torch, from PyPI's torch wheel. Idempotent: a second run changes nothing.
#
# Only the wheels the shared libraries need are installed (--no-deps): torch's CPU library
# still loads libcudart and libcupti at start-up, so those two NVIDIA runtime wheels come too
# (no GPU is needed or used). About 1.3 GB.
#
# Afterwards build and test with:
#   LIBTORCH="$(scripts/setup-torch.sh --print-libtorch)" cargo test -p inflight-predictor
set -euo pipefail

TORCH_VERSION=2.13.0 # tch 0.26 expects exactly this PyTorch release
CUDA_RUNTIME_VERSION=13.0.96
CUPTI_VERSION=13.0.85

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-torch"
python="${PYTHON:-python3}"

# Located through the venv's own interpreter so that a python other than 3.11 works too.
site_packages() {
  "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

if [[ "${1:-}" == "--print-libtorch" ]]; then
  echo "$(site_packages)/torch"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup-torch: creating $venv"
  "$python" -m venv "$venv"
else
  echo "setup-torch: $venv exists"
fi
# Keep the 1.3 GB out of git whatever the repo's .gitignore says (python >= 3.13 does this itself).
[[ -f "$venv/.gitignore" ]] || echo '*' >"$venv/.gitignore"

libtorch="$(site_packages)/torch"
if [[ ! -f "$libtorch/lib/libtorch_cpu.so" ]]; then
  echo "setup-torch: installing torch==$TORCH_VERSION (libraries only, ~1.3 GB) into $venv"
  "$venv/bin/pip" install --disable-pip-version-check --no-deps \
    "torch==$TORCH_VERSION" \
    "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION" \
    "nvidia-cuda-cupti==$CUPTI_VERSION"
else
  echo "setup-torch: libtorch already installed at $libtorch"
fi

echo "setup-torch: LIBTORCH=$libtorch"
