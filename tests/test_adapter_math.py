"""Adapter math on small random factors, checked against dense computations."""

import pytest
import torch

from safedlora_app.core import adapter_math as am


def _factors(d_out, d_in, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)


@pytest.mark.parametrize("form", am.FACTOR_FORMS)
def test_aggregate_products_equals_dense_weighted_mean_with_different_ranks(form):
    clients = [_factors(20, 12, r, seed) for seed, r in enumerate((2, 5, 3))]
    weights = [10.0, 30.0, 60.0]
    b, a = am.aggregate_products([c[0] for c in clients], [c[1] for c in clients], weights, max_rank=10, form=form)
    dense = sum(w / 100.0 * (bk.double() @ ak.double()) for w, (bk, ak) in zip(weights, clients))
    assert b.shape == (20, 10) and a.shape == (10, 12)
    assert torch.allclose(b.double() @ a.double(), dense, atol=1e-4)


@pytest.mark.parametrize("form", am.FACTOR_FORMS)
def test_truncation_error_equals_dropped_singular_values(form):
    clients = [_factors(30, 16, 4, seed) for seed in range(3)]
    bs, as_ = [c[0] for c in clients], [c[1] for c in clients]
    dense = sum(bk.double() @ ak.double() for bk, ak in clients) / 3
    sigma = torch.linalg.svdvals(dense)
    for rank in (1, 3, 7):
        b, a = am.aggregate_products(bs, as_, [1.0, 1.0, 1.0], max_rank=rank, form=form)
        error = torch.linalg.matrix_norm(dense - b.double() @ a.double()) ** 2
        assert error.item() == pytest.approx((sigma[rank:] ** 2).sum().item(), rel=1e-4)


def test_balanced_form_components_are_sorted_and_balanced():
    b, a = am.refactor(*_factors(15, 9, 4, 0), max_rank=4)
    col_norms, row_norms = b.norm(dim=0), a.norm(dim=1)
    assert torch.allclose(col_norms, row_norms, atol=1e-5)  # B = U sqrt(S), A = sqrt(S) V^T
    assert torch.all(col_norms[:-1] >= col_norms[1:])
    assert torch.allclose(col_norms * row_norms, am.singular_values(b, a).float(), atol=1e-4)


def test_orthonormal_a_form_puts_every_singular_value_in_b():
    b, a = am.refactor(*_factors(15, 9, 4, 0), max_rank=4, form="orthonormal-a")
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)  # A = V^T
    assert torch.allclose(b.norm(dim=0), am.singular_values(b, a).float(), atol=1e-4)  # B = U S


def test_dropped_update_measures_the_truncated_share_of_the_new_update():
    sent_b, sent_a = _factors(12, 10, 2, 9)
    g = torch.Generator().manual_seed(1)
    clients = [(sent_b + 0.1 * torch.randn(12, 2, generator=g), sent_a + 0.1 * torch.randn(2, 10, generator=g))
               for _ in range(3)]
    bs, as_ = [c[0] for c in clients], [c[1] for c in clients]
    mean = sum(bk.double() @ ak.double() for bk, ak in clients) / 3
    _, _, dropped, update = am.aggregate_module(bs, as_, [1.0, 1.0, 1.0], (sent_b, sent_a), max_rank=2)
    sigma = torch.linalg.svdvals(mean)
    assert update == pytest.approx(float(torch.linalg.matrix_norm(mean - sent_b.double() @ sent_a.double()) ** 2),
                                   rel=1e-6)
    assert dropped == pytest.approx(float((sigma[2:] ** 2).sum()), rel=1e-6)
    assert 0 < dropped < update


def test_components_beyond_numerical_rank_are_exact_zeros():
    b, a = am.aggregate_products([torch.randn(10, 2)], [torch.randn(2, 8)], [1.0], max_rank=6)
    assert b.shape == (10, 2)  # thin SVD of a rank-2 stack has 2 components
    b, a = am.resize(b, a, 6)
    assert am.dead_components(b, a).tolist() == [False, False, True, True, True, True]


def test_aggregate_factors_is_separate_weighted_mean_with_zero_padding():
    b1, a1 = torch.ones(4, 1), torch.ones(1, 3)
    b2, a2 = 2 * torch.ones(4, 2), 3 * torch.ones(2, 3)
    b, a = am.aggregate_factors([b1, b2], [a1, a2], [1.0, 3.0])
    assert torch.allclose(b, torch.tensor([[1.75, 1.5]] * 4))  # col 0: .25*1 + .75*2; col 1: .75*2
    assert torch.allclose(a, torch.tensor([[2.5] * 3, [2.25] * 3]))


def test_allocate_global_threshold_with_floor_and_cap():
    sigmas = {"q": torch.tensor([9.0, 8.0, 7.0, 6.0]), "v": torch.tensor([5.0, 0.5]),
              "k": torch.tensor([4.0, 3.0, 2.0])}
    # Floor 1 each (3), then the 4 largest remaining: q8, q7, q6, k3.  Cap 4 holds q at 4.
    assert am.allocate_ranks(sigmas, budget=7, floor=1, cap=4) == {"q": 4, "v": 1, "k": 2}
    # Cap 2: q stops at 2; next largest are k3 then v0.5 and k... -> q2 k2 v2
    assert am.allocate_ranks(sigmas, budget=6, floor=1, cap=2) == {"q": 2, "v": 2, "k": 2}
    # Floor 2 forces v's weak second component in.
    assert am.allocate_ranks(sigmas, budget=7, floor=2, cap=4) == {"q": 3, "v": 2, "k": 2}


def test_allocate_ties_round_robin_and_uniform():
    zeros = {name: torch.zeros(0) for name in "abc"}
    assert am.allocate_ranks(zeros, budget=8, floor=1, cap=8) == {"a": 3, "b": 3, "c": 2}
    sigmas = {"a": torch.tensor([100.0, 90.0]), "b": torch.tensor([1.0]), "c": torch.tensor([1.0])}
    assert am.allocate_ranks(sigmas, budget=7, floor=1, cap=4, uniform=True) == {"a": 3, "b": 2, "c": 2}


def test_allocate_rejects_infeasible_budget():
    with pytest.raises(ValueError, match="outside"):
        am.allocate_ranks({"a": torch.ones(2), "b": torch.ones(2)}, budget=1, floor=1, cap=2)


def test_revive_dead_components_keeps_product_and_is_seeded():
    b, a = am.resize(*_factors(6, 5, 2, 0), 4)
    b2, a2, revived = am.revive_dead_components(b, a, seed=7)
    assert revived == 2
    assert torch.equal(b2 @ a2, b @ a)  # B columns stay zero
    assert not am.dead_components(b2, a2).any()
    assert a2[2:].abs().max() <= 1 / 5 ** 0.5
    assert torch.equal(am.revive_dead_components(b, a, seed=7)[1], a2)
    assert not torch.equal(am.revive_dead_components(b, a, seed=8)[1], a2)


def test_revived_components_get_the_orthonormal_forms_scale():
    b, a = am.resize(*am.refactor(*_factors(6, 5, 2, 0), max_rank=2, form="orthonormal-a"), 4)
    b2, a2, revived = am.revive_dead_components(b, a, seed=7, form="orthonormal-a")
    assert revived == 2 and torch.equal(b2 @ a2, b @ a)
    assert torch.allclose(a2 @ a2.T, torch.eye(4), atol=1e-5)  # unit rows, orthogonal to the live ones


def test_dead_component_gets_no_gradient_until_revived():
    """Why revival exists: with A row = 0 and B column = 0, neither factor learns."""
    x, target = torch.randn(8, 5), torch.randn(8, 6)
    for revive, learns in ((False, False), (True, True)):
        b, a = torch.zeros(6, 1), torch.zeros(1, 5)
        if revive:
            b, a, _ = am.revive_dead_components(b, a, seed=0)
        b.requires_grad_(True)
        a.requires_grad_(True)
        ((x @ a.T @ b.T - target) ** 2).sum().backward()
        assert bool(b.grad.abs().sum() > 0) is learns


def test_wire_packing_round_trips_and_rejects_another_layout():
    from safedlora_app.core import payload as pl

    shapes = {"m0": (6, 4), "m1": (5, 3)}
    ranks = {"m1": 2, "m0": 3}  # the round's order, not the shapes' order
    g = torch.Generator().manual_seed(0)
    tensors = {"head::w": torch.randn(2, 3, generator=g)}
    for m, r in ranks.items():
        tensors[pl.key(pl.LORA_B, m)] = torch.randn(shapes[m][0], r, generator=g)
        tensors[pl.key(pl.LORA_A, m)] = torch.randn(r, shapes[m][1], generator=g)
    wire = pl.to_wire(tensors, list(ranks))
    assert set(wire) == {"head::w", pl.PACKED} and wire[pl.PACKED].numel() == pl.packed_size(ranks, shapes) == 46
    back = pl.from_wire(pl.unpack(pl.pack(wire)), ranks, shapes)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(pl.PayloadError, match="holds 46 values; the announced ranks need 36"):
        pl.from_wire(wire, {"m1": 2, "m0": 2}, shapes)
    assert pl.from_wire({"head::w": tensors["head::w"]}, {}, shapes).keys() == {"head::w"}  # full rounds


def _many_replies(count, rank, d_out, d_in, shared, seed):
    """``count`` replies that share ``shared`` of their signal (clients trained from one global adapter)."""
    g = torch.Generator().manual_seed(seed)
    common_b, common_a = torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)
    bs = [shared * common_b + torch.randn(d_out, rank, generator=g) for _ in range(count)]
    as_ = [shared * common_a + torch.randn(rank, d_in, generator=g) for _ in range(count)]
    return bs, as_


def _dense_mean(bs, as_):
    return sum(b.double() @ a.double() for b, a in zip(bs, as_)) / len(bs)


@pytest.mark.parametrize("form", am.FACTOR_FORMS)
def test_many_replies_are_sketched_and_keep_the_exact_top_components(form):
    bs, as_ = _many_replies(40, 8, 160, 120, shared=3.0, seed=0)  # stack 320 wide > EXACT_STACK_MAX
    assert sum(b.shape[1] for b in bs) > am.EXACT_STACK_MAX
    assert not am.top_product_svd(bs, as_, [1.0] * 40, 8)[3]
    u, s, vh = torch.linalg.svd(_dense_mean(bs, as_))
    assert s[7] / s[8] > 2  # the shared signal leaves a gap after component 8
    best = (u[:, :8] * s[:8]) @ vh[:8]
    b, a = am.aggregate_products(bs, as_, [1.0] * 40, max_rank=8, form=form)
    assert float((b.double() @ a.double() - best).norm() / best.norm()) < 1e-5  # float32 products
    again = am.aggregate_products(bs, as_, [1.0] * 40, max_rank=8, form=form)
    assert torch.equal(b, again[0]) and torch.equal(a, again[1])  # seeded: the same replies, the same result


def test_a_sketch_of_replies_at_mixed_ranks_and_weights_keeps_the_exact_top_components():
    """Capped nodes reply at lower ranks, and a node may weigh 0: the start (M applied to the weighted mean A, each
    A_k zero-padded) and the iteration must handle both."""
    bs, as_ = _many_replies(60, 8, 160, 120, shared=3.0, seed=3)
    cut = [8, 4, 2] * 20
    bs, as_ = [b[:, :r] for b, r in zip(bs, cut)], [a[:r] for a, r in zip(as_, cut)]
    weights = [0.0 if k % 7 == 0 else 1.0 + k % 3 for k in range(60)]
    assert sum(cut) > am.EXACT_STACK_MAX
    dense = sum(w * b.double() @ a.double() for w, b, a in zip(weights, bs, as_)) / sum(weights)
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    b, a = am.aggregate_products(bs, as_, weights, max_rank=8)
    assert float((b.double() @ a.double() - best).norm() / best.norm()) < 1e-5


def test_a_sketch_without_a_spectral_gap_is_still_a_best_approximation():
    bs, as_ = _many_replies(40, 8, 160, 120, shared=0.0, seed=1)  # independent replies: a flat spectrum
    mean = _dense_mean(bs, as_)
    sigma = torch.linalg.svdvals(mean)
    u, s, vh = am.sketched_product_svd(bs, as_, [1 / 40] * 40, rank=8)
    assert torch.allclose(s[:8], sigma[:8], rtol=1e-5)
    error = torch.linalg.matrix_norm(mean - (u[:, :8] * s[:8]) @ vh[:8]) ** 2
    best = float((sigma[8:] ** 2).sum())
    # sigma_8 / sigma_9 = 1.04: the iteration stops at SKETCH_MAX_ITERS before the residuals reach the tolerance,
    # and the kept components are still within 0.1% of the best approximation
    assert best <= float(error) < 1.001 * best


def test_a_sketched_module_reports_no_truncation_diagnostics():
    bs, as_ = _many_replies(40, 8, 160, 120, shared=3.0, seed=2)
    b, a, dropped, update = am.aggregate_module(bs, as_, [1.0] * 40, (bs[0], as_[0]), max_rank=8)
    assert b.shape == (160, 8) and dropped is None and update is None


@pytest.mark.parametrize("form", am.FACTOR_FORMS)
def test_the_aggregate_does_not_depend_on_the_order_of_the_replies(form):
    """The SVD leaves each component's sign free; summing the replies in another order could flip it."""
    clients = [_factors(30, 20, 4, seed) for seed in range(5)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    b, a = am.aggregate_products([c[0] for c in clients], [c[1] for c in clients], weights, max_rank=4, form=form)
    order = [3, 0, 4, 2, 1]
    b2, a2 = am.aggregate_products([clients[i][0] for i in order], [clients[i][1] for i in order],
                                   [weights[i] for i in order], max_rank=4, form=form)
    assert torch.allclose(b, b2, atol=1e-5) and torch.allclose(a, a2, atol=1e-5)


def test_allocate_by_cost_keeps_the_most_energy_per_value_that_fits():
    # "small" costs 4 values per component, "large" 12: energy per value 9/4, 4/4 (small) and 16/12, 12/12 (large).
    sigmas = {"small": torch.tensor([3.0, 3.0, 2.0]), "large": torch.tensor([4.0, 4.0, 3.5])}
    costs = {"small": 4, "large": 12}
    # Floor 1 costs 16; 20 more values: small's second (2.25 per value, 4) first, then large's second (16/12, 12);
    # large's third (12.25/12) does not fit in the 4 left, small's third (1.0 per value, 4) does.
    assert am.allocate_by_cost(sigmas, costs, 36, floor=1, cap=3) == {"small": 3, "large": 2}
    # Rank-based allocation would hand the large module its extra components first (larger sigma).
    assert am.allocate_ranks(sigmas, 4, floor=1, cap=3) == {"small": 1, "large": 3}
    assert am.allocate_by_cost(sigmas, costs, 16, floor=1, cap=3) == {"small": 1, "large": 1}
    fresh = {"a": torch.zeros(0), "b": torch.zeros(0)}  # all zeros: round-robin, as allocate_ranks
    assert am.allocate_by_cost(fresh, {"a": 2, "b": 2}, 8, floor=1, cap=4) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="budget 15 is below the floor's 16 values"):
        am.allocate_by_cost(sigmas, costs, 15, floor=1, cap=3)


def test_the_bytes_allocation_anneals_the_values_sent():
    from safedlora_app.core.config import RunConfig
    from safedlora_app.core.round_plan import adapter_at, budget

    config = RunConfig.from_mapping({"allocation": "bytes", "rank-max": 4, "rank-min": 1, "num-server-rounds": 6,
                                     "init-rounds": 1, "heat-rounds": 1, "cool-rounds": 1}).effective
    shapes = {"k": (8, 2), "up": (8, 24)}  # a component of "up" costs 32 values, one of "k" 10
    costs = {"k": 10, "up": 32}
    budgets = [budget(config, t, sum(costs.values())) for t in range(1, 7)]
    assert budgets[0] == 4 * 42 and budgets[-1] == 1 * 42 and budgets == sorted(budgets, reverse=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for m, (d_out, d_in) in shapes.items():
        tensors[f"lora_B::{m}"] = torch.randn(d_out, 4, generator=generator)
        tensors[f"lora_A::{m}"] = torch.randn(4, d_in, generator=generator)
    for t in range(1, 7):
        ranks, factors = adapter_at(config, t, tensors, shapes)
        assert sum(ranks[m] * costs[m] for m in ranks) <= budgets[t - 1] and all(1 <= r <= 4 for r in ranks.values())
        assert all(factors[m][0].shape[1] == ranks[m] for m in ranks)
    assert adapter_at(config, 6, tensors, shapes)[0] == {"k": 1, "up": 1}  # b_min: the floor everywhere


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_top_svd_gives_the_leading_components_and_the_energy_left_out(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u, s, vh, tail = am.top_svd(matrix, 3)
    full_u, full_s, full_vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(s, full_s[:3])
    torch.testing.assert_close((u * s) @ vh, (full_u[:, :3] * full_s[:3]) @ full_vh[:3])
    assert tail == pytest.approx(float((full_s[3:] ** 2).sum()), rel=1e-9)
    u, s, vh, tail = am.top_svd(matrix, 20)  # more than it has: every component, nothing left out
    torch.testing.assert_close((u * s) @ vh, matrix)
    assert tail == pytest.approx(0.0, abs=1e-9)
