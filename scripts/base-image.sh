#!/usr/bin/env bash
# Makes the base image the Dockerfiles build on (`ARG BASE_IMAGE`, default debian:bookworm-slim)
# on a machine that cannot pull from a registry: a minimal Debian bookworm root filesystem from
# the apt sources this machine already uses (mmdebstrap --variant=minbase, merged /usr, no docs,
# man pages or locales — what debian:bookworm-slim leaves out too), imported into the local
# Docker engine under a local tag. Idempotent: if the tag exists, nothing is done.
#
#   scripts/base-image.sh            # prints the tag (last line), builds it if missing
#   scripts/base-image.sh --force    # rebuild even if present
#   docker build --build-arg BASE_IMAGE="$(scripts/base-image.sh | tail -1)" ...
#
# Needs: a running Docker engine and mmdebstrap (installed with apt if missing; as root or sudo).
set -euo pipefail

TAG="${INFLIGHT_BASE_IMAGE:-local/debian:bookworm-slim}"
SUITE=bookworm
say() { echo "base-image: $*" >&2; }

force=false
[[ "${1:-}" == "--force" ]] && force=true

if ! docker info >/dev/null 2>&1; then
  say "no Docker engine answers (docker info failed): install Docker Engine (Debian: apt-get install docker.io) and start it"
  exit 1
fi

if ! $force && docker image inspect "$TAG" >/dev/null 2>&1; then
  say "$TAG present ($(docker image inspect -f '{{.Size}}' "$TAG" | numfmt --to=si)B), reused"
  echo "$TAG"
  exit 0
fi

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
if ! command -v mmdebstrap >/dev/null 2>&1; then
  say "installing mmdebstrap (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mmdebstrap >/dev/null
fi

# The machine's own apt sources (deb822 or one-line format), so the image installs from the
# same mirror the machine uses.
sources=()
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
  [[ -s "$f" ]] && grep -qE '^[[:space:]]*(deb |Types:)' "$f" && sources+=("$f")
done
((${#sources[@]})) || sources=("http://deb.debian.org/debian")

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
say "mmdebstrap $SUITE (minbase) from ${sources[*]}"
$sudo mmdebstrap --variant=minbase --mode=root --format=tar --quiet \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --aptopt='APT::Install-Recommends "false"' \
  "$SUITE" "$work/rootfs.tar" "${sources[@]}" >"$work/log" 2>&1 ||
  { cat "$work/log" >&2; say "mmdebstrap failed (log above)"; exit 1; }
docker import -c 'CMD ["bash"]' -m "mmdebstrap --variant=minbase $SUITE (scripts/base-image.sh)" \
  "$work/rootfs.tar" "$TAG" >/dev/null
say "$TAG imported in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | numfmt --to=si)B)"
echo "$TAG"
