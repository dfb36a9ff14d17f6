"""(h) Aggregation cost against the number of replies K, against FedIT's separate A/B averaging.

    python bench/aggregation_growth.py [--clients 10 100 1000] [--dim 4096] [--rank 16] [--modules 200]
                                       [--measured 8] [--exact-check 2]

The shape of a 7B model's attention projections: d = 4,096, r = 16, 200 adapted modules, K replies per round.
Each reply is the round's global factors plus the client's own change (``--spread`` of the global's size), as
clients that trained from one global adapter send. For each K, ``--measured`` modules are aggregated as the
server does (``adapter_math.aggregate_module``: exact QR + SVD up to a stack of ``EXACT_STACK_MAX`` columns,
randomized subspace iteration above) and as FedIT does (``aggregate_factors``) on the same replies, alternately,
each timed alone;
the modules all have the same shape, so a round's time is the median per module x ``--modules``. Printed: time per
round, the ratio to FedIT, the growth from the smallest K, the extra memory while aggregating one module (peak RSS
above the replies already held), and for ``--exact-check`` modules the difference from the exact decomposition
(``product_svd``) of the same replies. Goals: time grows at most linearly in K; at K = 100 within 5x of FedIT;
the result the same to float rounding.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time

import psutil
import torch

from safedlora_app.core import adapter_math as am

MIB = 2**20  # memory in MiB; bytes sent are MB (1e6), as in the app


def replies(count: int, dim: int, rank: int, spread: float, seed: int):
    """``count`` replies ``(B_k, A_k)`` around one global ``(B, A)`` (float32, as they arrive)."""
    g = torch.Generator().manual_seed(seed)
    b0 = torch.randn(dim, rank, generator=g) * 0.01
    a0 = torch.randn(rank, dim, generator=g) / math.sqrt(dim)
    bs = [b0 + spread * 0.01 * torch.randn(dim, rank, generator=g) for _ in range(count)]
    as_ = [a0 + spread / math.sqrt(dim) * torch.randn(rank, dim, generator=g) for _ in range(count)]
    return bs, as_, (b0, a0)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def peak_extra_bytes(fn) -> tuple[float, float]:
    """``(seconds, bytes)``: the call's wall time, and its peak resident memory above the memory before it."""
    process = psutil.Process()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return seconds, max(peak, process.memory_info().rss) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modules", type=int, default=200, help="modules of a round (time = per module x this)")
    parser.add_argument("--measured", type=int, default=8, help="modules measured per K")
    parser.add_argument("--exact-check", type=int, default=2, help="modules per K compared with product_svd")
    parser.add_argument("--spread", type=float, default=0.3, help="a client's change, relative to the global")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; d = {args.dim}, r = {args.rank}, "
          f"{args.modules} modules per round; exact decomposition up to a stack of {am.EXACT_STACK_MAX} columns")
    rows = []
    for count in args.clients:
        weights = [1.0] * count
        sa, fedit, memory, errors = [], [], [], []
        for module in range(args.measured):
            bs, as_, sent = replies(count, args.dim, args.rank, args.spread, seed=1000 * count + module)
            sa.append(timed(lambda: am.aggregate_module(bs, as_, weights, sent, args.rank)))
            fedit.append(timed(lambda: am.aggregate_factors(bs, as_, weights)))
            # Memory in a call of its own: the sampler thread would slow the timed ones down.
            memory.append(peak_extra_bytes(lambda: am.aggregate_module(bs, as_, weights, sent, args.rank))[1] / MIB)
            if module < args.exact_check:
                b, a = am.aggregate_products(bs, as_, weights, args.rank)
                u, s, vh = am.product_svd(bs, as_, [1.0 / count] * count)
                exact = (u[:, :args.rank] * s[:args.rank]) @ vh[:args.rank]
                errors.append(float((b.double() @ a.double() - exact).norm() / exact.norm()))
        row = {"K": count, "sa": statistics.median(sa) * args.modules, "fedit": statistics.median(fedit) * args.modules,
               "mb": max(memory), "error": max(errors) if errors else float("nan"),
               "path": "exact" if count * args.rank <= am.EXACT_STACK_MAX else "sketch"}
        rows.append(row)
        print(f"K={count:5d} ({row['path']}): sa-fedlora {row['sa']:.2f} s per round, fedit {row['fedit']:.2f} s -> "
              f"{row['sa'] / row['fedit']:.1f}x fedit; extra memory {row['mb']:.0f} MiB per module; "
              f"relative difference from the exact product {row['error']:.1e}", flush=True)
    first = rows[0]
    for row in rows[1:]:
        growth = row["sa"] / first["sa"]
        print(f"K {first['K']} -> {row['K']} ({row['K'] / first['K']:.0f}x the replies): sa-fedlora time "
              f"{growth:.1f}x ({'at most' if growth <= row['K'] / first['K'] else 'MORE than'} linear), "
              f"fedit {row['fedit'] / first['fedit']:.1f}x")


if __name__ == "__main__":
    main()
