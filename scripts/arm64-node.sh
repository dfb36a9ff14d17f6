#!/usr/bin/env bash
# An arm64 SuperNode under qemu-user emulation on an x86-64 Debian machine: the closest thing to a
# Raspberry Pi (64-bit Raspberry Pi OS is Debian arm64) that such a machine can run. Needs root,
# debootstrap, qemu-user-static and binfmt-support (docs/edge-devices.md has the whole recipe).
#
#   scripts/arm64-node.sh ROOTFS rootfs                          # debootstrap --arch arm64 (about 6 min)
#   scripts/arm64-node.sh ROOTFS install                         # venv + aarch64 torch + the app (emulated pip)
#   scripts/arm64-node.sh ROOTFS supernode ADDRESS "NODE-CONFIG" # flower-supernode --insecure in the rootfs
#
# The rootfs shares the host's network (a chroot, not a container): the SuperNode reaches a SuperLink
# on the host's loopback. Emulated time is not board time: qemu-user runs arm64 code several times
# slower than a Raspberry Pi 4 or 5 would.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rootfs=${1:?usage: $0 ROOTFS rootfs|install|supernode ADDRESS NODE-CONFIG}
action=${2:?usage: $0 ROOTFS rootfs|install|supernode ADDRESS NODE-CONFIG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

binfmt() {
  [[ -e /proc/sys/fs/binfmt_misc/status ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 > /dev/null 2>&1 || true
  [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || { echo "qemu-aarch64 is not registered with binfmt_misc"; exit 1; }
}

mounts() {  # /proc and /dev for Python and pip; the host's DNS and CA bundle for PyPI
  mountpoint -q "$rootfs/proc" || mount -t proc proc "$rootfs/proc"
  mountpoint -q "$rootfs/dev" || mount --rbind /dev "$rootfs/dev"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
}

case $action in
  rootfs)
    binfmt
    debootstrap --foreign --arch arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "$mirror"
    # binfmt's interpreter path is looked up inside the chroot (no F flag): put qemu there.
    mkdir -p "$rootfs/usr/libexec/qemu-binfmt"
    cp /usr/bin/qemu-aarch64-static "$rootfs/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    chroot "$rootfs" /debootstrap/debootstrap --second-stage
    ;;
  install)
    binfmt; mounts
    rm -rf "$rootfs/src" && mkdir -p "$rootfs/src"
    git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$rootfs/src")
    # Every version from constraints.txt but torch's: PyPI's aarch64 torch 2.13.0 is a CUDA build (it pulls
    # several GB of nvidia-*-cu13 wheels), and the PyTorch CPU index, which has 2.13.0+cpu for aarch64 (what
    # docs/edge-devices.md installs on a board), is not reachable from our CI. 2.9.1 is PyPI's last aarch64
    # CPU build; TORCH_SPEC picks another (e.g. with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
    grep -v '^torch==' "$repo/constraints.txt" > "$rootfs/src/constraints-arm64.txt"
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root ${PIP_EXTRA_INDEX_URL:+PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL} \
      /bin/sh -c "python3 -m venv /opt/venv && cd /src \
      && /opt/venv/bin/pip install --no-cache-dir '${TORCH_SPEC:-torch==2.9.1}' \
      && /opt/venv/bin/pip install --no-cache-dir -c constraints-arm64.txt . \
      && /opt/venv/bin/python -c 'import platform, torch, flwr, safedlora_app.client_app; \
print(platform.machine(), \"torch\", torch.__version__, \"flwr\", flwr.__version__)'"
    ;;
  supernode)
    binfmt; mounts
    address=${3:?supernode needs the SuperLink address}
    exec chroot "$rootfs" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root HF_HUB_OFFLINE=1 \
      FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1 \
      /opt/venv/bin/flower-supernode --insecure --superlink "$address" --node-config "${4:-}"
    ;;
  *) echo "unknown action $action: rootfs, install or supernode"; exit 2 ;;
esac
