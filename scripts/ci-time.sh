#!/usr/bin/env bash
# Time CI as it runs on a fresh machine: a fresh clone of this repository's HEAD, the Docker images the Compose tests
# build removed (Flower's stand-ins, the app image) with the build cache, then `CI=true bash .ci/run`.
#   bash scripts/ci-time.sh [LOG]      (as root, with nothing else running; LOG default /tmp/ci-time.log)
# Prints the exit status and the seconds; the whole output is in LOG.
set -u
log=${1:-/tmp/ci-time.log}
repo=$(cd "$(dirname "$0")/.." && pwd)
clone=$(mktemp -d /tmp/ci-clone-XXXXXX)
git clone -q "$repo" "$clone"
if docker info > /dev/null 2>&1; then
  flwr=$(grep -i '^flwr==' "$repo/constraints.txt" | cut -d= -f3)
  docker image rm -f safedlora-app:latest safedlora-app:no-cpu-torch "flwr/superlink:$flwr" "flwr/supernode:$flwr" \
    "flwr/superexec:$flwr" > /dev/null 2>&1
  docker builder prune -af > /dev/null 2>&1
fi
start=$(date +%s)
(cd "$clone" && CI=true bash .ci/run) > "$log" 2>&1
rc=$?
echo "rc=$rc seconds=$(( $(date +%s) - start )) clone=$clone log=$log" | tee -a "$log"
exit $rc
