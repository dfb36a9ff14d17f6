"""(e) Cost against federation size: 10, 100 and 1,000 simulated SuperNodes with the same number sampled per round.

    python bench/many_nodes.py [--nodes 10 100 1000] [--sampled 10] [--rounds 4] [--local-samples 32]
                               [--sim-dropout 0.0]

Each federation runs through the real `flwr run` on a private local SuperLink, on the embedded tweets split by
``inner-dirichlet`` (every node the same few dozen rows, each with its own Dirichlet(0.5) label mix; seeded), and
every sampled node trains ``--local-samples`` rows (32: each of 1,000 nodes holds 37 or 38), so that a round's work
is the same at every size. A
sampler reads the resident memory (RSS) of every process under that SuperLink twice a second: the ServerApp's
process (``flwr-simulation``), the Ray workers that run the ClientApps, and everything (SuperLink, Ray's own
processes included). Printed for each size: those peaks, the seconds of round 1 (it also asks every connected node
once for its limits and name) and the median seconds of the later rounds; then each size against the smallest.
Goal: 1,000 nodes cost at most 1.1x what 10 nodes cost, in memory and in time per round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.simulation import LocalFlower

MIB = 2**20  # memory in MiB; bytes sent are MB (1e6), as in the app


def role(process: psutil.Process) -> str:
    """``server`` (the ServerApp's process), ``worker`` (a Ray worker: ClientApps) or ``other``."""
    cmdline = " ".join(process.cmdline())
    if "flwr-simulation" in cmdline:
        return "server"
    return "worker" if cmdline.startswith("ray::") else "other"


def run(nodes: int, sampled: int, rounds: int, samples: int, dropout: float, work: Path) -> dict:
    flower = LocalFlower(work / f"home-{nodes}")
    (work / f"home-{nodes}").mkdir(parents=True)
    peak = {"server": 0.0, "worker": 0.0, "workers": 0.0, "total": 0.0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = {"server": [], "worker": [], "other": []}
            for process in flower.processes():
                try:
                    rss[role(process)].append(process.memory_info().rss / MIB)
                except psutil.Error:
                    pass
            peak["server"] = max(peak["server"], sum(rss["server"]))
            peak["worker"] = max(peak["worker"], max(rss["worker"], default=0.0))
            peak["workers"] = max(peak["workers"], sum(rss["worker"]))
            peak["total"] = max(peak["total"], sum(sum(v) for v in rss.values()))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    name = f"nodes-{nodes}-drop-{dropout}"
    settings = (f"num-server-rounds={rounds} init-rounds=1 heat-rounds=0 cool-rounds=1 "
                f"fraction-train={sampled / nodes} min-nodes={sampled} partitioner='inner-dirichlet' "
                f"local-samples={samples} "
                f"sim-dropout={dropout} out-dir='{work / 'runs'}' run-name='{name}' cache-dir='{work / 'cache'}'")
    start = time.perf_counter()
    try:
        result = flower.run(settings, timeout=3600, federation=f"num-supernodes={nodes}")
        status = flower.run_status(result.stdout + result.stderr)
    finally:
        done.set()
        sampler.join()
        flower.stop()
    if status != "finished:completed":
        raise SystemExit(f"{nodes} nodes: run {status}:\n{(result.stdout + result.stderr)[-3000:]}")
    rows, summary = RunFolder(work / "runs" / name).records(), RunFolder(work / "runs" / name).summary()
    return {**peak, "wall": time.perf_counter() - start, "first": rows[1]["round-seconds"],
            "later": statistics.median(r["round-seconds"] for r in rows[2:]),
            "replies": sum(r["replies"] for r in rows), "dropped": sum(r["dropped"] for r in rows),
            "accuracy": summary["final-accuracy"], "mb": summary["total-mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-samples", type=int, default=32)
    parser.add_argument("--sim-dropout", type=float, default=0.0)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: need at least 2 (round 1 also asks every node for its limits)")
    work = Path(tempfile.mkdtemp(prefix="safedlora-nodes-"))
    results = {}
    for nodes in args.nodes:
        r = results[nodes] = run(nodes, args.sampled, args.rounds, args.local_samples, args.sim_dropout, work)
        print(f"{nodes} nodes, {args.sampled} sampled per round, {args.local_samples} samples each, sim-dropout "
              f"{args.sim_dropout}: peak RSS server "
              f"{r['server']:.0f} MiB, workers {r['workers']:.0f} MiB (largest {r['worker']:.0f} MiB), all "
              f"{r['total']:.0f} MiB; round 1 {r['first']:.1f} s, later rounds {r['later']:.1f} s (median); "
              f"{r['replies']} replies, {r['dropped']} dropped; final accuracy {r['accuracy']:.1%}, "
              f"{r['mb']:.2f} MB sent; wall {r['wall']:.0f} s", flush=True)
    small = results[min(args.nodes)]
    for nodes, r in results.items():
        if nodes != min(args.nodes):
            print(f"{nodes} / {min(args.nodes)} nodes: server memory {r['server'] / small['server']:.3f}x, workers "
                  f"{r['workers'] / small['workers']:.3f}x, all {r['total'] / small['total']:.3f}x; time per round "
                  f"(later rounds) {r['later'] / small['later']:.3f}x, round 1 {r['first'] / small['first']:.2f}x "
                  f"(goal <= 1.1)")


if __name__ == "__main__":
    main()
