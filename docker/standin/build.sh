#!/usr/bin/env bash
# Build offline stand-ins for the Flower images that docker/compose.yml uses (flwr/superlink,
# flwr/supernode and flwr/superexec at the flwr pin of constraints.txt), for machines that cannot
# reach Docker Hub. Needs root, a running Docker engine and debootstrap. Users pull the real images.
#
#   docker/standin/build.sh            # skips images that already exist (real or stand-in)
#
# The base is a minimal Debian bookworm (Python 3.11) made with debootstrap and imported into Docker.
# It trusts the host's CA bundle, so that pip inside works behind a TLS-inspecting proxy the host trusts.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^flwr==//p' "$root/constraints.txt")
base=safedlora-standin/debian:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

exists() { docker image inspect "$1" > /dev/null 2>&1; }

if ! exists "$base"; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm ($mirror) into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
    > "$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  tar -C "$rootfs" -c . | docker import -c 'LABEL org.safedlora.standin=true' - "$base"
fi
for target in superlink supernode superexec; do
  image="flwr/$target:$version"
  if exists "$image"; then
    echo "$image exists; kept"
    continue
  fi
  docker build --quiet --network host -f "$root/docker/standin/Dockerfile" --target "$target" \
    --build-arg "FLWR_VERSION=$version" --label org.safedlora.standin=true -t "$image" "$root/docker/standin"
  echo "built stand-in $image"
done
