"""Opt-in: an arm64 SuperNode under qemu-user emulation trains 2 rounds of the default model with the
low-memory profile, next to a native SuperNode, and both nodes' replies are aggregated.

Prepare the root filesystem once (root, Debian, qemu-user-static, binfmt-support, debootstrap; 13 min measured):

    scripts/arm64-node.sh /var/tmp/arm64 rootfs && scripts/arm64-node.sh /var/tmp/arm64 install

then ``SAFEDLORA_ARM64_ROOTFS=/var/tmp/arm64 pytest -m arm64 -s tests/test_arm64.py``. The SuperLink and the
ServerApp run natively on this machine; the SuperNode and its ClientApps run arm64 code in the chroot. The
test prints each round's wall time and the emulated ClientApp's own log lines (seconds per sample, precision,
peak memory): emulated time is not board time.
"""

import os
import platform
import re
import subprocess
from pathlib import Path

import pytest
from support.deployment import ROOT, Deployment, free_ports

from safedlora_app.core.profiles import LOW_MEMORY_NODE, node_config_text
from safedlora_app.core.run_folder import RunFolder

ROOTFS = os.environ.get("SAFEDLORA_ARM64_ROOTFS", "")
NODE_SCRIPT = ROOT / "scripts" / "arm64-node.sh"
LOW_MEMORY = node_config_text(LOW_MEMORY_NODE)
EMULATED_TIMEOUT = 3000  # s for the node to start and the 2 rounds to finish under emulation

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(not ROOTFS, reason="opt-in: set SAFEDLORA_ARM64_ROOTFS to a rootfs made by "
                                          "scripts/arm64-node.sh (rootfs, then install)"),
    pytest.mark.skipif(bool(ROOTFS) and not (Path(ROOTFS) / "opt/venv/bin/flower-supernode").exists(),
                       reason=f"{ROOTFS} has no app installed: run scripts/arm64-node.sh {ROOTFS} install"),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root"),
]


def test_an_emulated_arm64_supernode_trains_two_rounds_next_to_a_native_one(tmp_path):
    d = Deployment(tmp_path)
    try:
        link, native_port = free_ports(2)
        d.start("superlink", ["flower-superlink", "--insecure", "--port", link, "--database", tmp_path / "state.db",
                              "--disable-runtime-dependency-installation"])
        d.start("arm64-node", ["bash", NODE_SCRIPT, ROOTFS, "supernode", f"127.0.0.1:{link}",
                               f"partition-id=0 num-partitions=2 {LOW_MEMORY}"])
        d.start("native-node", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                                native_port, "--node-config", f"partition-id=1 num-partitions=2 {LOW_MEMORY}"])
        alive = ["superlink", "arm64-node", "native-node"]
        d.connection("arm64", f"127.0.0.1:{link}", insecure=True)
        d.wait_for(lambda: (ids := d.online_nodes("arm64")) and len(ids) == 2, "both SuperNodes online",
                   timeout=600, alive=alive)
        # precision stays "auto": it must pick float32 on the emulated aarch64 CPU (no native bf16 there).
        cli, log, outputs = d.launch("arm64", "arm64",
                                     settings="local-samples=8 test-size=32 val-size=32 precision='auto'")
        cli.wait(timeout=EMULATED_TIMEOUT)
        d.wait_for(lambda: RunFolder(outputs).finished, "the run's summary", timeout=EMULATED_TIMEOUT,
                   alive=alive)
        rows = RunFolder(outputs).records()
        # Both nodes trained in both rounds: their replies were aggregated, none dropped.
        assert [r["round"] for r in rows] == [0, 1, 2], rows
        assert all(r["replies"] == 2 and r["dropped"] == 0 for r in rows[1:]), rows
        machine = subprocess.run(["chroot", ROOTFS, "/usr/bin/uname", "-m"], capture_output=True, text=True)
        assert machine.stdout.strip() == "aarch64" != platform.machine()
        emulated = re.findall(r"round \d+: trained \d+ samples in .*", d.log("arm64-node", tail=200_000))
        native = re.findall(r"round \d+: trained \d+ samples in .*", d.log("native-node", tail=200_000))
        assert len(emulated) == len(native) == 2, (emulated, native)
        # qemu 7.2 shows the emulated process the host's /proc/cpuinfo (x86 flags): auto must not read them as
        # the aarch64 CPU's. (A newer qemu prints the emulated CPU's own features; its `max` CPU has BF16.)
        assert all("float32" in line for line in emulated), emulated
        for r in rows[1:]:
            print(f"round {r['round']}: {r['round-seconds']:.0f} s wall")
        print("emulated aarch64:", *emulated, "native x86-64:", *native, sep="\n  ")
    finally:
        d.stop()
