"""LoRA adapter math: aggregation, SVD form, global rank allocation, truncation.

Pure tensor functions (no Flower, no I/O). One adapted module holds ``B`` (d_out x r) and
``A`` (r x d_in) with update ``dW = s * B @ A``. The server keeps ``B = U sqrt(S)``,
``A = sqrt(S) V^T`` (balanced SVD form), so component j carries singular value ``S[j]`` and
truncating to the first r components is the best rank-r approximation (Eckart-Young).
Nothing here ever forms the d_out x d_in matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .config import FACTOR_FORMS

Tensor = torch.Tensor


def product_svd(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``sum_k w_k B_k A_k`` without forming it.

    Stacks ``[sqrt(w_k) B_k]`` column-wise and ``[sqrt(w_k) A_k]`` row-wise, QR-factors both
    stacks and takes the SVD of the small core: O((d_in + d_out) q^2) for q = sum of ranks.

    Parameters
    ----------
    bs, as_ : sequences of Tensor
        Client factors ``B_k`` (d_out x r_k) and ``A_k`` (r_k x d_in); ranks may differ.
    weights : sequence of float
        Non-negative weights ``w_k`` (not normalised here).

    Returns
    -------
    U, S, Vh : Tensor
        float64; ``U`` d_out x q', ``S`` descending, ``Vh`` q' x d_in.
    """
    roots = [math.sqrt(w) for w in _checked(bs, as_, weights)]
    b_stack = torch.cat([r * b.double() for r, b in zip(roots, bs)], dim=1)
    a_stack = torch.cat([r * a.double() for r, a in zip(roots, as_)], dim=0)
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_stack.T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u_core, s, vh_core @ q_a.T


def split_factors(u: Tensor, s: Tensor, vh: Tensor, rank: int, form: str = "balanced") -> tuple[Tensor, Tensor]:
    """Factors of the first ``rank`` SVD components, float32, in one of two forms of the same product.

    ``balanced``: ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` (both factors of a small update are small).
    ``orthonormal-a``: ``B = U S``, ``A = V^T`` (FlexLoRA's and FedSVD's split: A's rows have norm 1,
    every singular value sits in B). Components beyond the numerical rank are set exactly to zero,
    so they are recognised as dead (see ``revive_dead_components``) instead of carrying rounding noise.
    """
    if form not in FACTOR_FORMS:
        raise ValueError(f"factor form {form!r} is not one of {FACTOR_FORMS}")
    rank = min(rank, s.numel())
    # An SVD fixes each component only up to the sign of (u_j, v_j); the summation order of the replies can flip it.
    # One sign per component (u_j's largest entry positive) makes the factors depend on the mean alone.
    u, vh = u[:, :rank], vh[:rank]
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1.0
    u, vh = u * signs, vh * signs[:, None]
    s = s[:rank].clone()
    tolerance = (s[0] if rank else 0.0) * max(u.shape[0], vh.shape[1]) * torch.finfo(torch.float64).eps
    dead = s <= tolerance
    s[dead] = 0.0
    if form == "balanced":
        root = s.sqrt()
        return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()
    a = vh[:rank].clone()
    a[dead] = 0.0
    return (u[:, :rank] * s).float(), a.float()


def top_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(U, S, Vh, tail)``: the top ``rank`` SVD components of a dense matrix (float64) and the squared Frobenius
    norm of the rest, from the eigendecomposition of its smaller Gram matrix.

    On one thread, for a 1536 x 576 matrix, the eigendecomposition took 0.045 s against the full SVD's 0.18 s on this
    project's 2-core machine (7 December 2026). Squaring the matrix squares its condition number, so the components
    far below the largest lose relative accuracy; the top ones, which truncation keeps, do not.
    """
    m = matrix.double()
    wide = m.shape[0] < m.shape[1]
    values, vectors = torch.linalg.eigh(m @ m.T if wide else m.T @ m)  # ascending
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    k = min(rank, values.numel())
    s = values[:k].sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a zero component stays zero (split_factors marks it dead)
    if wide:
        u = vectors[:, :k]
        vh = (u.T @ m) / safe[:, None]
    else:
        vh = vectors[:, :k].T
        u = (m @ vh.T) / safe
    return u, s, vh, max(float(m.pow(2).sum()) - float(values[:k].sum()), 0.0)


#: Widest client stack (the replies' ranks summed) that :func:`top_product_svd` decomposes exactly with
#: :func:`product_svd`, whose cost grows with the width squared. Wider stacks (more than 32 replies at rank 8)
#: go through :func:`sketched_product_svd`, whose cost grows linearly in the number of replies.
EXACT_STACK_MAX = 256
#: Extra sketch columns beyond the rank kept: the range finder's error bound shrinks with them.
SKETCH_OVERSAMPLE = 8
#: Subspace iteration stops once every kept component's residual ``||M v_i - s_i u_i||`` is at most this share of
#: the largest singular value (float32 arithmetic rounds at about 1e-6 of it), or after SKETCH_MAX_ITERS iterations.
SKETCH_TOLERANCE, SKETCH_MAX_ITERS = 1e-5, 30


def _checked(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float]) -> Sequence[float]:
    if not (len(bs) == len(as_) == len(weights)) or not bs:
        raise ValueError("need one B, one A and one weight per client, and at least one client")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    return weights


def _row_sums(stack: Tensor, ranks: Sequence[int], weights: Sequence[float]) -> Tensor:
    """``sum_k w_k A_k`` over the replies stacked one above the other in ``stack`` (reply k holds ``ranks[k]``
    rows), each ``A_k`` zero-padded to the largest rank: one read of the stack, no transposed copy."""
    if len(set(ranks)) == 1:
        w = torch.tensor(weights, dtype=stack.dtype)
        return torch.einsum("k,krd->rd", w, stack.view(len(ranks), ranks[0], stack.shape[1]))
    total = stack.new_zeros(max(ranks), stack.shape[1])
    for w, part in zip(weights, stack.split(list(ranks), dim=0)):
        total[:part.shape[0]].add_(part, alpha=w)
    return total


def _small_svd(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the wide ``y.T`` (l x d) through a QR of the tall ``y`` (d x l): the SVD of an l x l core instead
    of an l x d matrix (which took 2.4 ms of a 17 ms sketch iteration at d = 4,096, l = 24)."""
    q, r = torch.linalg.qr(y)
    u, s, vh = torch.linalg.svd(r.T, full_matrices=False)
    return u, s, vh @ q.T


def sketched_product_svd(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float], rank: int,
                         seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank + SKETCH_OVERSAMPLE`` SVD components of ``M = sum_k w_k B_k A_k``, by randomized subspace
    iteration on the stacked factors (Halko, Martinsson & Tropp 2011, algorithm 4.4).

    Every product multiplies the stacks ``[w_k B_k]`` (d_out x q) and ``[A_k]`` (q x d_in) by a block of
    l = rank + oversample columns, so one iteration costs O((d_in + d_out) q l) for q = sum of ranks: linear in the
    number of replies, where :func:`product_svd` costs O((d_in + d_out) q^2 + q^3). The products run in float32
    (the replies' own type: half the memory traffic of float64) and the small SVDs in float64. The iteration starts
    from ``M`` applied to the weighted sum of the A factors (replies that trained from one global adapter share its
    row space, so one iteration from there converged in ``bench/aggregation_growth.py``, where the weighted sum of
    the B factors needed two), plus random columns, and stops once the top ``rank`` components' residuals fall
    under ``SKETCH_TOLERANCE``, or after ``SKETCH_MAX_ITERS`` iterations: without a spectral gap after component
    ``rank`` (independent replies) it may stop there above the tolerance, with components still within 0.1% of the
    best approximation in ``tests/test_adapter_math.py``. Seeded: the same replies give the same result on the same
    BLAS and thread count.

    Returns
    -------
    U, S, Vh : Tensor
        float64, ``S`` descending; the components past ``rank`` are less accurate.
    """
    ranks = [b.shape[1] for b in bs]
    weights = _checked(bs, as_, weights)
    columns = torch.tensor(weights, dtype=torch.float32).repeat_interleave(torch.tensor(ranks))
    b_stack = torch.cat([b.float() for b in bs], dim=1).mul_(columns)
    a_stack = torch.cat([a.float() for a in as_], dim=0)
    width = min(rank + SKETCH_OVERSAMPLE, b_stack.shape[0], a_stack.shape[1], b_stack.shape[1])
    generator = torch.Generator().manual_seed(seed)
    mean_a = _row_sums(a_stack, ranks, weights)  # sum_k w_k A_k: what FedIT sends as A
    start = b_stack @ (a_stack @ mean_a.T)  # M (sum_k w_k A_k)^T: one power step from the replies' shared rows
    start = torch.cat([start, torch.randn(b_stack.shape[0], width, generator=generator)], dim=1)[:, :width]
    q = torch.linalg.qr(start)[0]
    for iteration in range(SKETCH_MAX_ITERS):
        # Rayleigh-Ritz on range(Q): Q^T M = (M^T Q)^T = U_s S V^T, so M ~ (Q U_s) S V^T.
        u_small, s, vh = _small_svd((a_stack.T @ (b_stack.T @ q)).double())
        u = q.double() @ u_small
        mv = (b_stack @ (a_stack @ vh.T.float())).double()  # M V: the residuals now, the next Q if needed
        residual = float((mv[:, :rank] - u[:, :rank] * s[:rank]).norm(dim=0).max())
        if not s[0] > 0 or residual <= SKETCH_TOLERANCE * float(s[0]) or iteration == SKETCH_MAX_ITERS - 1:
            return u, s, vh
        q = torch.linalg.qr(mv.float())[0]
    raise AssertionError("unreachable: the loop returns on its last iteration")


def top_product_svd(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float],
                    rank: int) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``(U, S, Vh, complete)``: at least the top ``rank`` SVD components of ``sum_k w_k B_k A_k``.

    Exact (:func:`product_svd`, every component, ``complete = True``) while the stack is at most
    ``EXACT_STACK_MAX`` wide, else :func:`sketched_product_svd` (the top components only).
    """
    if sum(b.shape[1] for b in bs) <= EXACT_STACK_MAX:
        return (*product_svd(bs, as_, weights), True)
    return (*sketched_product_svd(bs, as_, weights, rank), False)


def aggregate_products(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float],
                       max_rank: int, form: str = "balanced") -> tuple[Tensor, Tensor]:
    """Weighted mean of client products, truncated to ``max_rank`` components and re-factored in SVD form (see
    ``split_factors``).

    The mean ``sum_k p_k B_k A_k`` (``p_k = w_k / sum w``) is never formed; its best approximation at that rank
    comes from the exact decomposition, or, for more than ``EXACT_STACK_MAX`` stacked components, from the
    sketch (the same components to float32 accuracy; see ``top_product_svd``).
    """
    return aggregate_module(bs, as_, weights, None, max_rank, form)[:2]


def aggregate_module(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float],
                     sent: tuple[Tensor, Tensor] | None, max_rank: int,
                     form: str = "balanced") -> tuple[Tensor, Tensor, float | None, float | None]:
    """``(B, A, dropped, update)``: one module's aggregate (see ``aggregate_products``), and what truncating it
    dropped, from the same decomposition.

    ``dropped`` and ``update`` are the squared Frobenius norms of what truncation to ``max_rank`` drops and of
    the round's mean update ``sum_k p_k B_k A_k - B_sent A_sent`` (the mean of K clients at rank r has rank
    up to K r, so truncation can drop part of the new update; their ratio says how much). Both are ``None``
    without ``sent`` or when the decomposition was sketched (its discarded tail is not computed).
    """
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"total weight must be > 0, got {total}")
    p = [w / total for w in weights]
    u, s, vh, complete = top_product_svd(bs, as_, p, max_rank)
    b, a = split_factors(u, s, vh, max_rank, form)
    if sent is None or not complete:
        return b, a, None, None
    # From the update's own stack: expanding ||M - S||^2 would cancel, and a resumed run round differently.
    update = float((product_svd([*bs, sent[0]], [*as_, -sent[1]], [*p, 1.0])[1] ** 2).sum())
    return b, a, float((s[max_rank:] ** 2).sum()), update


def aggregate_factors(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FedIT/HetLoRA baseline: weighted means of A and B separately, zero-padded to the largest rank.

    The mean of products is *not* the product of means; this is the comparison point.
    """
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"total weight must be > 0, got {total}")
    rank = max(b.shape[1] for b in bs)
    b_mean = sum((w / total) * resize(b, a, rank)[0].double() for w, b, a in zip(weights, bs, as_))
    a_mean = sum((w / total) * resize(b, a, rank)[1].double() for w, b, a in zip(weights, bs, as_))
    return b_mean.float(), a_mean.float()


def refactor(b: Tensor, a: Tensor, max_rank: int, form: str = "balanced") -> tuple[Tensor, Tensor]:
    """Re-factor any ``(B, A)`` into SVD form (same product, sorted components, at most ``max_rank``)."""
    return aggregate_products([b], [a], [1.0], max_rank, form)


def singular_values(b: Tensor, a: Tensor) -> Tensor:
    """Singular values of ``B @ A`` (descending, float64), without forming the product."""
    return product_svd([b], [a], [1.0])[1]


def resize(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Keep the first ``rank`` components, zero-padding if there are fewer."""
    current = b.shape[1]
    if rank <= current:
        return b[:, :rank], a[:rank]
    extra = rank - current
    return (torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
            torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0))


def allocate_ranks(sigmas: Mapping[str, Tensor], budget: int, floor: int, cap: int,
                   uniform: bool = False) -> dict[str, int]:
    """Split a total-rank ``budget`` over modules.

    Global allocation (the "adaptive parameter allocation"): every module keeps ``floor``
    components; the rest of the budget goes to the largest singular values across *all*
    modules (one global threshold), at most ``cap`` per module. Ties (e.g. all zeros at the
    start) go round-robin by component index, so equal energy gives equal ranks.

    Parameters
    ----------
    sigmas : mapping of module name to Tensor
        Each module's singular values, descending (missing components count as 0).
    budget : int
        Total rank, ``floor * M <= budget <= cap * M`` for M modules.
    floor, cap : int
        Per-module bounds, ``1 <= floor <= cap``.
    uniform : bool
        Ablation: equal ranks (``budget // M``, the remainder to the first modules).

    Returns
    -------
    dict
        Module name to rank, in the order of ``sigmas``; ranks sum to ``budget``.
    """
    names = list(sigmas)
    count = len(names)
    if not 1 <= floor <= cap:
        raise ValueError(f"need 1 <= floor ({floor}) <= cap ({cap})")
    if not floor * count <= budget <= cap * count:
        raise ValueError(f"budget {budget} is outside [{floor * count}, {cap * count}] for {count} modules")
    if uniform:
        base, extra = divmod(budget, count)
        return {name: base + (i < extra) for i, name in enumerate(names)}
    candidates = []
    for m, name in enumerate(names):
        values = sigmas[name].double().tolist()
        for j in range(floor, cap):
            candidates.append((-(values[j] if j < len(values) else 0.0), j, m))
    candidates.sort()
    ranks = dict.fromkeys(names, floor)
    for _, _, m in candidates[: budget - floor * count]:
        ranks[names[m]] += 1
    return ranks


def allocate_by_cost(sigmas: Mapping[str, Tensor], costs: Mapping[str, int], budget: int, floor: int,
                     cap: int) -> dict[str, int]:
    """Split a budget of *values* over modules: the greedy knapsack on energy per value.

    Every module keeps ``floor`` components; the rest of the budget goes to the components of largest
    ``sigma**2 / cost`` across all modules (a component of module m costs ``costs[m]`` values, d_out + d_in),
    at most ``cap`` per module, each taken while it fits. Within a module the singular values fall and the cost
    is the same, so the kept components are always a module's first ones. Ties (all zeros at the start) go
    round-robin by component index, as :func:`allocate_ranks`.

    Parameters
    ----------
    sigmas : mapping of module name to Tensor
        Each module's singular values, descending (missing components count as 0).
    costs : mapping of module name to int
        Values one component of the module sends (both factors).
    budget : int
        Values to spend, at least ``floor`` components of every module.
    floor, cap : int
        Per-module rank bounds, ``1 <= floor <= cap``.

    Returns
    -------
    dict
        Module name to rank, in the order of ``sigmas``; the kept components cost at most ``budget`` values.
    """
    names = list(sigmas)
    if not 1 <= floor <= cap:
        raise ValueError(f"need 1 <= floor ({floor}) <= cap ({cap})")
    least = floor * sum(costs[n] for n in names)
    if budget < least:
        raise ValueError(f"budget {budget} is below the floor's {least} values")
    candidates = []
    for m, name in enumerate(names):
        values = sigmas[name].double().tolist()
        for j in range(floor, cap):
            energy = values[j] ** 2 if j < len(values) else 0.0
            candidates.append((-energy / costs[name], j, m))
    candidates.sort()
    ranks, left = dict.fromkeys(names, floor), budget - least
    for _, _, m in candidates:
        if costs[names[m]] <= left:
            ranks[names[m]] += 1
            left -= costs[names[m]]
    return ranks


def dead_components(b: Tensor, a: Tensor) -> Tensor:
    """Boolean mask of components whose A row and B column are both exactly zero.

    Such a component gets no gradient in either factor, so it could never learn.
    """
    return (a.abs().amax(dim=1) == 0) & (b.abs().amax(dim=0) == 0)


def revive_dead_components(b: Tensor, a: Tensor, seed: int, form: str = "balanced") -> tuple[Tensor, Tensor, int]:
    """Give dead components a fresh random A row and a zero B column, at the form's init scale.

    ``B @ A`` is unchanged (the B column stays zero), but both factors now get gradients.
    ``balanced`` draws the rows from ``U(-1/sqrt(d_in), 1/sqrt(d_in))``, which is what peft's
    ``kaiming_uniform_(a=sqrt(5))`` gives for lora_A. ``orthonormal-a`` draws the same and then
    orthonormalises them against A's live rows, so that A keeps orthonormal rows. Seeded by ``seed``.

    Returns
    -------
    b, a, revived : Tensor, Tensor, int
        New tensors (inputs untouched) and how many components were revived.
    """
    dead = dead_components(b, a)
    revived = int(dead.sum())
    if not revived:
        return b, a, 0
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(a.shape[1])
    fresh = (torch.rand(revived, a.shape[1], generator=generator, dtype=torch.float64) * 2 - 1) * bound
    if form == "orthonormal-a":
        live = a[~dead].double()
        q, _ = torch.linalg.qr(torch.cat([live, fresh]).T)  # columns: live rows first, so they span the same
        fresh = q[:, live.shape[0]:].T
    a = a.clone()
    a[dead] = fresh.to(a.dtype)
    return b.clone(), a, revived
