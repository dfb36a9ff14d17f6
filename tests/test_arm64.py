"""Opt-in: an arm64 SuperNode under qemu-user emulation trains 2 tiny rounds with the low-memory profile.

Prepare the root filesystem once (root, Debian, qemu-user-static, binfmt-support, debootstrap; about 25 min):

    scripts/arm64-node.sh /var/tmp/arm64 rootfs && scripts/arm64-node.sh /var/tmp/arm64 install

then ``SAFEDLORA_ARM64_ROOTFS=/var/tmp/arm64 pytest -m arm64 -s tests/test_arm64.py``. The SuperLink and the
ServerApp run natively on this machine; the SuperNode and its ClientApps run arm64 code in the chroot. The
test prints each round's wall time and the ClientApp's peak memory: emulated time is not board time.
"""

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
from test_deployment import ROOT, Deployment, free_ports

ROOTFS = os.environ.get("SAFEDLORA_ARM64_ROOTFS", "")
NODE_SCRIPT = ROOT / "scripts" / "arm64-node.sh"
LOW_MEMORY = "batch-size=4 grad-accum-steps=4 torch-threads=1 max-seq-len=48"
EMULATED_TIMEOUT = 3000  # s for the node to start and the 2 rounds to finish under emulation

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(not ROOTFS, reason="opt-in: set SAFEDLORA_ARM64_ROOTFS to a rootfs made by "
                                          "scripts/arm64-node.sh (rootfs, then install)"),
    pytest.mark.skipif(bool(ROOTFS) and not (Path(ROOTFS) / "opt/venv/bin/flower-supernode").exists(),
                       reason=f"{ROOTFS} has no app installed: run scripts/arm64-node.sh {ROOTFS} install"),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root"),
]


def test_an_emulated_arm64_supernode_trains_two_rounds(tmp_path):
    d = Deployment(tmp_path)
    try:
        link = free_ports(1)[0]
        d.start("superlink", ["flower-superlink", "--insecure", "--port", link, "--database", tmp_path / "state.db",
                              "--disable-runtime-dependency-installation"])
        d.start("arm64-node", ["bash", NODE_SCRIPT, ROOTFS, "supernode", f"127.0.0.1:{link}",
                               f"partition-id=0 num-partitions=2 {LOW_MEMORY}"])
        d.connection("arm64", f"127.0.0.1:{link}", insecure=True)
        d.wait_for(lambda: d.online_nodes("arm64"), "the arm64 SuperNode online", timeout=600,
                   alive=["superlink", "arm64-node"])
        cli, log, outputs = d.launch("arm64", "arm64", settings="min-nodes=1 local-samples=8 test-size=32")
        cli.wait(timeout=EMULATED_TIMEOUT)
        d.wait_for(lambda: (outputs / "summary.json").exists(), "the run's summary", timeout=EMULATED_TIMEOUT,
                   alive=["superlink", "arm64-node"])
        rows = [json.loads(line) for line in (outputs / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 1 for r in rows[1:]), rows
        machine = subprocess.run(["chroot", ROOTFS, "/usr/bin/uname", "-m"], capture_output=True, text=True)
        assert machine.stdout.strip() == "aarch64" != platform.machine()
        for r in rows[1:]:
            print(f"round {r['round']}: {r['round-seconds']:.0f} s wall, client training {r['train-seconds']:.0f} s, "
                  f"ClientApp peak {r['peak-memory-mb']:.0f} MB (emulated aarch64 on {platform.machine()})")
    finally:
        d.stop()
