"""(i) How many SuperNodes one SuperLink serves: a real deployment on loopback, N = 10, 25, 50 SuperNodes.

    python bench/many_supernodes.py [--nodes 10 25 50] [--sampled 2] [--rounds 3] [--local-samples 16]
                                    [--round-timeout S] [--database file|memory]

For each N: one ``flower-superlink`` (plain HTTP on 127.0.0.1, free ports, a private FLWR_HOME) and N
``flower-supernode`` processes, each with its partition of the embedded tweets (``inner-dirichlet``, N
partitions) and Flower's default isolation (the SuperNode starts a ClientApp process for each message); then
``flwr run`` of ``--rounds`` small rounds with ``--sampled`` nodes training per round. Round 1 also asks all N
nodes for their limits at once: N ClientApp processes. A sampler reads the proportional set size (PSS: shared
library pages split between the processes that map them, so the sum is what the processes really take) of every
process about once a second: the SuperLink (with its ServerApp process), the SuperNodes (each is two processes: the node
and its ClientApp launcher), and their ClientApp processes; and the machine's available memory, stopping the
fleet (and saying so) if it falls below 1 GiB. Printed for each N: the seconds until all N were online, those
peaks (MiB), round 1 and the median of the later rounds, the longest round, the replies per round, the lost
replies and the SQLite lock errors; then each N against the smallest.

``--round-timeout`` is the app's default (3,600 s) unless given: a lost message must not make a round wait for it.
``--database file`` (default) runs the SuperLink on a SQLite file, as docs/deployment.md does; ``memory`` on
Flower's in-memory state (nothing survives a SuperLink restart).
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.deployment import LocalDeployment
from safedlora_app.tools.simulation import APP_ROOT, free_port

MIB = 2**20
ROLES = ("superlink", "serverapp", "supernodes", "clientapps")
LOW_MEMORY_MIB = 1024


class Fleet(LocalDeployment):
    """One SuperLink and its SuperNodes (the app's launcher of local federations), and each role's peak PSS."""

    def __init__(self, work: Path, nodes: int, database: str = "file"):
        super().__init__(work)
        self.nodes = nodes
        self.database = str(work / "state.db") if database == "file" else ":memory:"
        self.link: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.peak = dict.fromkeys((*ROLES, "total"), 0.0)
        self.most_clientapps = 0
        self.least_available = float("inf")  # MiB
        self.low_memory = threading.Event()  # set when the sampler stopped the fleet
        self._seen: dict[int, psutil.Process] = {}  # every process sampled: stop() also reaches orphans
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def bring_up(self) -> float:
        """Start the SuperLink and the N SuperNodes; the seconds until ``flwr supernode ls`` lists all N online."""
        link = free_port()
        self.link = self.start("superlink", [
            "flower-superlink", "--insecure", "--port", str(link), "--database", self.database,
            "--disable-runtime-dependency-installation"])
        self.connection("bench", f"127.0.0.1:{link}", insecure=True)
        started = time.perf_counter()
        ports = {link}  # free_port() does not hold its port: hand each one out once
        for i in range(self.nodes):
            while (port := free_port()) in ports:
                pass
            ports.add(port)
            self.supernodes.append(self.start(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={self.nodes}"]))
        self._sampler.start()
        while (online := len(self.online_nodes("bench") or ())) < self.nodes:
            if self.low_memory.is_set():
                raise RuntimeError("stopped for low memory")
            if dead := [i for i, p in enumerate(self.supernodes) if p.poll() is not None]:
                raise SystemExit(f"SuperNode {dead[0]} exited with {self.supernodes[dead[0]].returncode} "
                                 f"({len(dead)} exited in all); its log: {self.work / f'supernode-{dead[0]}.log'}")
            if self.link.poll() is not None:
                raise SystemExit(f"the SuperLink exited with {self.link.returncode}; its log: "
                                 f"{self.work / 'superlink.log'}")
            if time.perf_counter() - started > 120 + 2 * self.nodes:
                raise SystemExit(f"only {online} of {self.nodes} SuperNodes online after "
                                 f"{time.perf_counter() - started:.0f} s (logs: {self.work})")
            time.sleep(1.0)
        return time.perf_counter() - started

    def run(self, settings: str, timeout: float = 1800) -> str:
        """``flwr run`` of the app on this fleet; its final status."""
        result = self.flwr("run", APP_ROOT, "bench", "--stream", "--run-config", settings, timeout=timeout)
        output = result.stdout + result.stderr
        (self.work / "flwr-run.log").write_text(output)
        started = re.search(r"Successfully started run (\d+)", output)
        if not started:
            raise SystemExit(f"flwr run did not start:\n{output[-3000:]}")
        for _ in range(60):  # `flwr run --stream` may return a moment before the run's status is final
            if self.low_memory.is_set():
                raise RuntimeError("stopped for low memory")
            if (status := self.run_status(started.group(1), "bench")).startswith("finished"):
                return status
            time.sleep(1.0)
        return status

    def stop(self) -> None:
        """Every process started here, its descendants (the SuperLink detaches its SuperExec), and every process
        the sampler saw under them (a child whose parent died is no longer in the tree), by PID."""
        self._done.set()
        if self._sampler.is_alive():
            self._sampler.join()
        self._stop_all()

    def _stop_all(self) -> None:
        super().stop(also=self._seen.values())

    def _sample(self) -> None:
        while not self._done.is_set():
            pss = dict.fromkeys(ROLES, 0.0)
            clientapps = 0
            for root, kind in ((self.link, "superlink"), *((n, "supernodes") for n in self.supernodes)):
                for process in _tree(root.pid):
                    self._seen.setdefault(process.pid, process)
                    try:
                        cmdline = " ".join(process.cmdline())
                        value = process.memory_full_info().pss / MIB
                    except psutil.Error:
                        continue
                    if "flwr-serverapp" in cmdline:
                        pss["serverapp"] += value
                    elif "flwr-clientapp" in cmdline:
                        pss["clientapps"] += value
                        clientapps += 1
                    else:
                        pss[kind] += value
            for role, value in pss.items():
                self.peak[role] = max(self.peak[role], value)
            self.peak["total"] = max(self.peak["total"], sum(pss.values()))
            self.most_clientapps = max(self.most_clientapps, clientapps)
            self.least_available = min(self.least_available, psutil.virtual_memory().available / MIB)
            if self.least_available < LOW_MEMORY_MIB:  # the machine's limit: stop here rather than swap or OOM
                self.low_memory.set()
                self._stop_all()
                return
            time.sleep(1.0)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def measure(nodes: int, sampled: int, rounds: int, samples: int, work: Path, round_timeout: float | None = None,
            database: str = "file") -> dict:
    fleet = Fleet(work / f"nodes-{nodes}", nodes, database)
    out = work / "runs"
    # min-nodes is also the fewest sampled: all N are online before the run starts (Fleet.bring_up).
    settings = (f"num-server-rounds={rounds} init-rounds=1 heat-rounds=0 cool-rounds=1 rank-max=4 rank-min=1 "
                f"fraction-train={sampled / nodes} min-nodes={sampled} partitioner='inner-dirichlet' "
                f"local-samples={samples} test-size=64 val-size=64 node-wait-timeout=120 "
                f"out-dir='{out}' run-name='nodes-{nodes}' cache-dir='{work / 'cache'}'")
    if round_timeout is not None:
        settings += f" round-timeout={round_timeout}"
    try:
        online = fleet.bring_up()
        start = time.perf_counter()
        status = fleet.run(settings)
        wall = time.perf_counter() - start
    except Exception:
        if not fleet.low_memory.is_set():
            raise
    finally:
        fleet.stop()
    if fleet.low_memory.is_set():  # whatever failed after the sampler stopped the fleet, this is why
        raise SystemExit(f"{nodes} SuperNodes: stopped, the machine's available memory fell below "
                         f"{LOW_MEMORY_MIB} MiB (peaks so far, MiB: {fleet.peak}; logs: {fleet.work})")
    if status != "finished:completed":
        raise SystemExit(f"{nodes} SuperNodes: run {status} (logs: {fleet.work})")
    rows = RunFolder(out / f"nodes-{nodes}").records()
    return {**fleet.peak, "online": online, "available": fleet.least_available, "wall": wall,
            "most-clientapps": fleet.most_clientapps,
            "first": rows[1]["round-seconds"], "later": statistics.median(r["round-seconds"] for r in rows[2:]),
            "longest": max(r["round-seconds"] for r in rows[1:]),
            "replies": [r["replies"] for r in rows[1:]],
            "lost": len(re.findall(r"did not report its limits|did not answer the limits query|no \w+ reply from node",
                                   (fleet.work / "flwr-run.log").read_text())),
            "locked": sum(log.read_text(errors="replace").count("database is locked")
                          for log in fleet.work.glob("*.log")),
            "locked-link": (fleet.work / "superlink.log").read_text(errors="replace").count("database is locked")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--sampled", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-samples", type=int, default=16)
    parser.add_argument("--round-timeout", type=float, default=None,
                        help="the run's round-timeout in s (default: the app's, 3600)")
    parser.add_argument("--database", choices=("file", "memory"), default="file",
                        help="the SuperLink's state: a SQLite file (default) or Flower's in-memory state")
    args = parser.parse_args()
    if args.round_timeout is not None and args.round_timeout <= 0:
        parser.error(f"--round-timeout {args.round_timeout}: must be > 0 s")
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: need at least 2 (round 1 also asks every node for its limits)")
    if any(n < args.sampled for n in args.nodes):
        parser.error(f"--nodes {args.nodes}: each must be at least --sampled {args.sampled}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the fleet's stop (start_new_session)
    work = Path(tempfile.mkdtemp(prefix="safedlora-supernodes-"))
    timeout = "the app's default" if args.round_timeout is None else f"{args.round_timeout:g} s"
    print(f"SuperLink state: {args.database}; round-timeout: {timeout}", flush=True)
    results = {}
    for nodes in sorted(set(args.nodes)):
        r = results[nodes] = measure(nodes, args.sampled, args.rounds, args.local_samples, work, args.round_timeout,
                                     args.database)
        print(f"{nodes} SuperNodes, {args.sampled} training per round: all online after {r['online']:.0f} s; "
              f"peak PSS SuperLink {r['superlink']:.0f} MiB, ServerApp {r['serverapp']:.0f} MiB, SuperNodes "
              f"{r['supernodes']:.0f} MiB ({r['supernodes'] / nodes:.0f} MiB each), ClientApp processes "
              f"{r['clientapps']:.0f} MiB (at most {r['most-clientapps']} at once), all {r['total']:.0f} MiB; round 1 "
              f"{r['first']:.1f} s, later rounds {r['later']:.1f} s (median), longest {r['longest']:.1f} s; "
              f"replies per round {r['replies']}; warnings of lost replies {r['lost']} ('database is locked' in "
              f"the logs: {r['locked']}, the SuperLink's {r['locked-link']}); "
              f"run {r['wall']:.0f} s; least available memory {r['available']:.0f} MiB", flush=True)
    small = min(args.nodes)
    for nodes, r in results.items():
        if nodes != small:
            s = results[small]
            print(f"{nodes} / {small} SuperNodes: SuperLink memory {r['superlink'] / s['superlink']:.2f}x, all "
                  f"{r['total'] / s['total']:.2f}x; round 1 {r['first'] / s['first']:.2f}x, later rounds "
                  f"{r['later'] / s['later']:.2f}x")


if __name__ == "__main__":
    main()
