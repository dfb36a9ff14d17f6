"""(c) Exact aggregation (QR + small SVD) against a dense SVD of the mean update, and its share of a round.

    python bench/aggregation.py [--metrics RUN_DIR/metrics.jsonl]

For d = 384, 1024 and 4096 (square modules), K = 10 clients at rank r = 16 with equal weights:
``adapter_math.aggregate_products`` against forming the dense ``sum_k p_k B_k A_k`` (d x d) and
taking its SVD, both in float64 and both truncated to rank 16. Goal: >= 10x at 4096. Both results
are checked to be the same matrix. With ``--metrics``, the share of each round that the strategy
spent aggregating (``aggregate-seconds`` / ``round-seconds``, measured in that run) is printed
too. Goal: <= 2% of a default round.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import describe, timed

from safedlora_app.core import adapter_math as am


def dense(bs, as_, weights, rank):
    delta = sum(w * b.double() @ a.double() for w, b, a in zip(weights, bs, as_))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", default=None, help="a run's metrics.jsonl, for the share of a round")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float64")
    for d in (384, 1024, 4096):
        g = torch.Generator().manual_seed(d)
        bs = [torch.randn(d, args.rank, generator=g) * 0.1 for _ in range(args.clients)]
        as_ = [torch.randn(args.rank, d, generator=g) * 0.1 for _ in range(args.clients)]
        weights = [1.0 / args.clients] * args.clients
        repeats = 5 if d < 4096 else 2
        exact_times, dense_times = [], []
        for _ in range(repeats):
            exact_times.append(timed(lambda: am.aggregate_products(bs, as_, weights, max_rank=args.rank)))
            dense_times.append(timed(lambda: dense(bs, as_, weights, args.rank)))
        b, a = am.aggregate_products(bs, as_, weights, max_rank=args.rank)
        db, da = dense(bs, as_, weights, args.rank)
        error = float((b.double() @ a.double() - db @ da).norm() / (db @ da).norm())
        ratios = [x / y for x, y in zip(dense_times, exact_times)]
        print(f"d={d}: exact {statistics.median(exact_times) * 1e3:.1f} ms, dense SVD "
              f"{statistics.median(dense_times) * 1e3:.1f} ms -> exact is {statistics.median(ratios):.1f}x faster "
              f"(pairwise min {min(ratios):.1f}x, n={repeats}); same rank-{args.rank} result to {error:.1e}")
    if args.metrics:
        rows = [json.loads(line) for line in open(args.metrics)]
        shares = [r["aggregate-seconds"] / r["round-seconds"] for r in rows if r["round"] > 0 and r["round-seconds"]]
        print(describe(f"aggregation share of a round ({args.metrics})", [100 * s for s in shares], "%"))
        seconds = statistics.median(r["aggregate-seconds"] for r in rows if r["round"] > 0)
        print(f"aggregation per round: {seconds:.3f} s (validation of the replies included)")


if __name__ == "__main__":
    main()
