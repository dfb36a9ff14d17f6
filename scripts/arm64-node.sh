#!/usr/bin/env bash
# An arm64 SuperNode under qemu-user emulation on an x86-64 Debian machine: the closest thing to a
# Raspberry Pi (64-bit Raspberry Pi OS is Debian arm64) that such a machine can run. Needs root,
# debootstrap, qemu-user-static and binfmt-support (docs/edge-devices.md has the whole recipe).
#
#   scripts/arm64-node.sh ROOTFS rootfs                          # debootstrap --arch arm64 (3.5 min measured)
#   scripts/arm64-node.sh ROOTFS install                         # venv + aarch64 torch + the app (emulated pip)
#   scripts/arm64-node.sh ROOTFS supernode ADDRESS "NODE-CONFIG" # flower-supernode --insecure in the rootfs
#   scripts/arm64-node.sh ROOTFS run COMMAND...                  # e.g. python bench/client_round.py, on this tree
#   scripts/arm64-node.sh ROOTFS umount                          # the mounts above (before rm -rf ROOTFS)
#
# The rootfs shares the host's network (a chroot, not a container): the SuperNode reaches a SuperLink
# on the host's loopback. Emulated time is not board time: qemu-user runs arm64 code several times
# slower than a Raspberry Pi 4 or 5 would.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: $0 ROOTFS rootfs|install|supernode ADDRESS NODE-CONFIG|run COMMAND...|umount"
rootfs=${1:?$usage}
action=${2:?$usage}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

binfmt() {
  [[ -e /proc/sys/fs/binfmt_misc/status ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 > /dev/null 2>&1 || true
  [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || { echo "qemu-aarch64 is not registered with binfmt_misc"; exit 1; }
}

mounts() {  # /proc and /dev for Python and pip, /sys for torch's CPU detection; the host's DNS and CA bundle
  mountpoint -q "$rootfs/proc" || mount -t proc proc "$rootfs/proc"
  # rslave: unmounting them later never propagates back to the host's own /dev and /sys mounts
  mountpoint -q "$rootfs/dev" || { mount --rbind /dev "$rootfs/dev" && mount --make-rslave "$rootfs/dev"; }
  mountpoint -q "$rootfs/sys" || { mount --rbind /sys "$rootfs/sys" && mount --make-rslave "$rootfs/sys"; }
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
}

copy_source() {  # this working tree's tracked files (as they are now) to /src in the rootfs
  rm -rf "$rootfs/src" && mkdir -p "$rootfs/src"
  git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$rootfs/src")
}

# What every emulated process gets: no host environment, the node's venv, offline hub, no telemetry.
node_env=(/usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
          FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1)

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
    copy_source
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
    exec chroot "$rootfs" "${node_env[@]}" \
      /opt/venv/bin/flower-supernode --insecure --superlink "$address" --node-config "${4:-}"
    ;;
  run)  # the installed dependencies, with this tree's code first on the path (PYTHONPATH=/src)
    binfmt; mounts; copy_source
    shift 2
    exec chroot "$rootfs" "${node_env[@]}" PYTHONPATH=/src /bin/sh -c 'cd /src && exec "$@"' sh "$@"
    ;;
  umount)  # the host's /dev and /sys are bound inside: unmount before deleting the rootfs
    for mount in dev sys proc; do
      if mountpoint -q "$rootfs/$mount"; then umount -R "$rootfs/$mount"; fi  # a failure stops here (set -e)
    done
    ;;
  *) echo "unknown action $action: rootfs, install, supernode, run or umount"; exit 2 ;;
esac
