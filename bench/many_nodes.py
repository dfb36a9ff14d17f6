"""(e) Peak memory of a 100-node simulation with 10 nodes sampled per round, against a 10-node one.

    python bench/many_nodes.py [--nodes 10 100] [--sampled 10] [--rounds 3]

Each federation runs through the real `flwr run` on a private local SuperLink. A sampler reads the
resident memory (RSS) of every process under that SuperLink (ServerApp, Ray and its workers) twice
a second; printed are the peak of their sum and of the largest single process, for each size, and
the ratio of the largest federation to the smallest. Goal: ~1.0 (memory does not grow with the
number of nodes: one Ray worker serves many virtual nodes with one shared model).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from safedlora_app.tools.simulation import LocalFlower

MB = 2**20


def superlink_tree(flower: LocalFlower) -> list[psutil.Process]:
    needle = f"127.0.0.1:{flower.control_port}"
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and needle in cmdline:
            return [process, *process.children(recursive=True)]
    return []


def run(nodes: int, sampled: int, rounds: int, work: Path) -> dict:
    flower = LocalFlower(work / f"home-{nodes}")
    (work / f"home-{nodes}").mkdir(parents=True)
    peak = {"sum": 0.0, "max": 0.0, "processes": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = []
            for process in superlink_tree(flower):
                try:
                    rss.append(process.memory_info().rss)
                except psutil.Error:
                    pass
            if rss:
                peak["sum"] = max(peak["sum"], sum(rss) / MB)
                peak["max"] = max(peak["max"], max(rss) / MB)
                peak["processes"] = max(peak["processes"], len(rss))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    settings = (f"num-server-rounds={rounds} init-rounds=1 heat-rounds=0 cool-rounds=1 "
                f"fraction-train={sampled / nodes} min-nodes={sampled} local-samples=32 test-size=200 "
                "partitioner='iid' "
                f"out-dir='{work / 'runs'}' run-name='nodes-{nodes}' cache-dir='{work / 'cache'}'")
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
    rows = [json.loads(line) for line in (work / "runs" / f"nodes-{nodes}" / "metrics.jsonl").read_text().splitlines()]
    return {**peak, "seconds": time.perf_counter() - start, "trained": sum(r["replies"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safedlora-nodes-"))
    results = {}
    for nodes in args.nodes:
        results[nodes] = run(nodes, args.sampled, args.rounds, work)
        r = results[nodes]
        print(f"{nodes} nodes, {args.sampled} sampled per round, {args.rounds} rounds ({r['trained']} client "
              f"rounds): peak RSS sum {r['sum']:.0f} MB over up to {r['processes']} processes, largest process "
              f"{r['max']:.0f} MB, {r['seconds']:.0f} s", flush=True)
    small, large = results[min(args.nodes)], results[max(args.nodes)]
    print(f"peak memory {max(args.nodes)} / {min(args.nodes)} nodes: sum {large['sum'] / small['sum']:.3f}x, "
          f"largest process {large['max'] / small['max']:.3f}x (goal ~1.0)")


if __name__ == "__main__":
    main()
