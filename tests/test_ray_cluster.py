"""The simulation on a Ray cluster the user started (`ray start --head`, `ray start --address=...`): two raylets
on this machine, one CPU each, so that the two simulated nodes' actors must land one on each."""

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.simulation import BIN, LocalFlower, free_port, stop_processes

pytestmark = [pytest.mark.e2e, pytest.mark.extended, pytest.mark.xdist_group("flower-simulation")]

TINY = ("num-server-rounds=2 local-samples=16 test-size=32 val-size=32 batch-size=8 eval-batch-size=32 min-nodes=2 "
        "precision='fp32' init-rounds=1 heat-rounds=0 cool-rounds=1 rank-max=4 rank-min=1")
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1"


class RayNode:
    """One `ray start --block` (a head or a worker raylet) with its own CPU count, stopped by its process tree.

    ``RAY_TMPDIR`` points at a private folder: no other Ray process on this machine finds this cluster through
    /tmp/ray/ray_current_cluster (which a plain ``ray.init()`` would join)."""

    def __init__(self, env: dict, *args: str):
        self.process = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1",
                                         "--object-store-memory=100000000", *args], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def hosts_client_actor(self) -> bool:
        """Whether a ClientApp actor of Flower's simulation runs under this raylet now."""
        for process in self.tree():
            try:
                if "ClientAppActor" in " ".join(process.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    def stop(self) -> None:
        stop_processes(self.tree(), timeout=20)


def alive_nodes(env: dict, address: str) -> int:
    """How many raylets the cluster at ``address`` counts as alive."""
    probe = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes())); ray.shutdown()" % address)
    result = subprocess.run([str(BIN / "python"), "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 and result.stdout.strip() else 0


@pytest.fixture
def ray_cluster():
    """``(address, [head, worker])`` of a two-raylet cluster, stopped (only its own processes) afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(folder), "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    nodes = [RayNode(env, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={folder}")]
    try:
        deadline = time.monotonic() + 120
        while alive_nodes(env, address) < 1:
            assert time.monotonic() < deadline, "the head raylet did not start within 120 s"
            time.sleep(1)
        nodes.append(RayNode(env, f"--address={address}"))
        while alive_nodes(env, address) < 2:
            assert time.monotonic() < deadline, "the two raylets did not both join within 120 s"
            time.sleep(1)
        yield address, env, nodes
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run(flower: LocalFlower, out: Path, name: str) -> tuple[list[dict], dict]:
    result = flower.run(f"{TINY} out-dir='{out}' run-name='{name}' cache-dir='{out / 'cache'}'",
                        federation=FEDERATION, timeout=600)
    output = result.stdout + result.stderr
    assert flower.run_status(output) == "finished:completed", output[-4000:]
    rows = RunFolder(out / name).records()
    return rows, load_file(str(out / name / "adapter" / "adapter_model.safetensors"))


def test_the_simulation_spreads_over_a_two_raylet_cluster_and_gives_the_single_machine_result(ray_cluster, tmp_path):
    address, env, nodes = ray_cluster
    on_cluster = LocalFlower(tmp_path / "home-cluster")
    (tmp_path / "home-cluster").mkdir()
    on_cluster.env.update(RAY_ADDRESS=address, RAY_TMPDIR=env["RAY_TMPDIR"])  # what a user exports before flwr run
    seen, done = [False, False], threading.Event()

    def watch():
        while not done.is_set():
            for i, node in enumerate(nodes):
                seen[i] = seen[i] or node.hosts_client_actor()
            time.sleep(0.5)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cluster_rows, cluster_adapter = run(on_cluster, tmp_path, "cluster")
    finally:
        done.set()
        watcher.join()
        on_cluster.stop()
    assert seen == [True, True], f"ClientApp actors seen under the head / worker raylet: {seen}"

    alone = LocalFlower(tmp_path / "home-alone")
    (tmp_path / "home-alone").mkdir()
    try:
        alone_rows, alone_adapter = run(alone, tmp_path, "alone")
    finally:
        alone.stop()
    assert [r["round"] for r in cluster_rows] == [0, 1, 2]
    for on_two, on_one in zip(cluster_rows, alone_rows):
        assert on_two["loss"] == pytest.approx(on_one["loss"], rel=1e-5)
        assert on_two["accuracy"] == on_one["accuracy"]
        assert on_two["bytes-down"] == on_one["bytes-down"] and on_two["bytes-up"] == on_one["bytes-up"]
    assert cluster_adapter.keys() == alone_adapter.keys()
    for key, tensor in cluster_adapter.items():
        assert torch.allclose(tensor, alone_adapter[key], atol=1e-5), key
