"""Client-level differential privacy (issue #41): each node's update clipped where the aggregation is linear, a
fixed-weight mean, Gaussian noise, the SVD truncation after it, and the accountant's epsilon. Tiny shapes,
hand-computed expectations."""

import math
import random

import numpy as np
import pytest
import torch
from support.runs import run_server
from support.strategy import FakeGrid, initial, make_strategy, reply, send, trained

from safedlora_app.core import accounting
from safedlora_app.core import payload as pl
from safedlora_app.core import privacy as dp
from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.round_plan import plan_round
from safedlora_app.server.aggregation import node_update, private_aggregate_round, update_space
from safedlora_app.server.private_rounds import PrivateRounds

SHAPES = {"q": (6, 4), "v": (5, 3)}  # at rank-max 4 no product has more than 4 components: truncation is exact
HEAD = "head::w"
METHODS = {"product": {}, "factors": {"method": "fedit"}, "frozen A": {"method": "ffa-lora"}}


def config(**values) -> RunConfig:
    return RunConfig.from_mapping({"rank-max": 4, "rank-min": 1, "num-server-rounds": 3, "seed": 7,
                                   "dp-noise-multiplier": 1.0, "dp-clip": 0.5, **values}).effective


def start(c: RunConfig, shapes=SHAPES, head_shape=(2, 3)):
    """Round 1's plan and the global tensors it started from (a head; the adapter is the plan's)."""
    previous = {HEAD: torch.randn(head_shape, generator=torch.Generator().manual_seed(1))}
    return plan_round(c, 1, previous, shapes), previous


def a_reply(plan, previous, seed, size=1.0, cap=0):
    """A node's trained tensors: what it was sent plus seeded changes of ``size``; with ``cap``, a node sent
    ``cap`` components per module, its reply padded back as the server does."""
    g = torch.Generator().manual_seed(seed)
    sent = plan.capped(cap)
    tensors = {HEAD: previous[HEAD] + size * torch.randn(previous[HEAD].shape, generator=g)}
    for m, (b, a) in sent.factors.items():
        tensors[pl.key(pl.LORA_B, m)] = b + size * torch.randn(b.shape, generator=g)
        tensors[pl.key(pl.LORA_A, m)] = a if plan.frozen_a else a + size * torch.randn(a.shape, generator=g)
    return plan.padded(tensors)


def dense(update):
    return {k: p.dense() if isinstance(p, dp.LowRank) else p.double() for k, p in update.items()}


def distance(x, y):
    return math.sqrt(sum(float((x[k] - y[k]).pow(2).sum()) for k in x))


def test_the_norm_of_a_low_rank_change_is_its_dense_matrix_norm():
    g = torch.Generator().manual_seed(0)
    b, a, b0, a0 = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g), torch.randn(7, 2, generator=g), \
        torch.randn(2, 5, generator=g)
    change = dp.product_change(b, a, b0, a0, scale=2.0)
    expected = 2.0 * (b.double() @ a.double() - b0.double() @ a0.double())
    assert change.shape == (7, 5)
    torch.testing.assert_close(change.dense(), expected)
    assert change.squared_norm() == pytest.approx(float(expected.pow(2).sum()), rel=1e-12)
    assert dp.update_norm({"x": change, "h": torch.ones(2, 2)}) == pytest.approx(math.sqrt(change.squared_norm() + 4))


def test_clipping_scales_only_updates_above_the_clip():
    assert dp.clip_coefficient(0.3, 0.5) == 1.0 and dp.clip_coefficient(0.5, 0.5) == 1.0
    assert dp.clip_coefficient(2.0, 0.5) == 0.25 and dp.clip_coefficient(0.0, 0.5) == 1.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cap", [0, 1])
def test_one_node_moves_the_mean_by_at_most_c_over_m_whatever_it_sends(method, cap):
    """Without noise, adding any one node's reply (a huge one, or one trained at rank 1 against rank 4) moves the
    aggregate, measured where the aggregation is linear, by at most C/m; a huge one by exactly C/m."""
    c = config(**METHODS[method], **{"dp-noise-multiplier": 0.0, "dp-target-epsilon": 1.0})
    plan, previous = start(c)
    mechanism = dp.Mechanism(clip=0.5, noise_multiplier=0.0, expected_nodes=2.5)
    others = [a_reply(plan, previous, seed) for seed in (1, 2)]

    def moved(*replies):
        new, _ = private_aggregate_round(c, plan, replies, previous, mechanism, np.random.default_rng(0))
        return dense(node_update(c, plan, new, previous))  # the aggregate's change from what the round started

    without = moved(*others)
    for size, exactly in ((1e-3, False), (1e3, True)):
        influence = distance(moved(*others, a_reply(plan, previous, 3, size, cap)), without)
        assert influence <= mechanism.sensitivity * (1 + 1e-6)  # float32 factors round in the 7th digit
        if exactly:
            assert influence == pytest.approx(mechanism.sensitivity, rel=1e-6)


def test_the_noise_has_the_stated_scale_and_is_released_with_no_reply():
    """z = 2, C = 0.5, m = 4: standard deviation 0.25 on every coordinate of the mean, even in a round where
    no node replied (the release is the same mechanism every round)."""
    c = config(method="fedit", **{"dp-noise-multiplier": 2.0})
    plan, previous = start(c, shapes={"q": (300, 200)}, head_shape=(300, 200))
    mechanism = dp.Mechanism(clip=0.5, noise_multiplier=2.0, expected_nodes=4.0)
    assert mechanism.noise_std == 0.25
    new, diagnostics = private_aggregate_round(c, plan, [], previous, mechanism, np.random.default_rng(3))
    for change in (new[HEAD] - previous[HEAD], new["lora_B::q"] - plan.factors["q"][0]):
        n = change.numel()  # 60,000 and 1,200 draws: 5 standard errors of the mean and of the deviation
        assert abs(float(change.mean())) < 5 * 0.25 / math.sqrt(n)
        assert float(change.std()) == pytest.approx(0.25, rel=5 / math.sqrt(2 * n))
    assert diagnostics["dp"] == {"norm": None, "clipped": None}


def test_the_svd_truncation_comes_after_the_noise():
    """Product aggregation: the new adapter is the best rank-max approximation of (what was sent + the noised
    mean), drawn here again by hand from the same generator; the noised matrix had full rank, the adapter rank 2."""
    c = config(**{"rank-max": 2, "dp-noise-multiplier": 0.7})
    plan, previous = start(c, shapes={"q": (12, 10)})
    mechanism = dp.Mechanism(clip=0.5, noise_multiplier=0.7, expected_nodes=2.0)
    node = a_reply(plan, previous, 4)
    new, _ = private_aggregate_round(c, plan, [node], previous, mechanism, np.random.default_rng(9))

    update = dense(node_update(c, plan, node, previous))
    weight = min(1.0, 0.5 / math.sqrt(sum(float(p.pow(2).sum()) for p in update.values()))) / 2.0
    g = np.random.default_rng(9)
    noised = {k: weight * update[k] + mechanism.noise_std * torch.from_numpy(g.standard_normal(shape))
              for k, shape in update_space(c, plan, previous).items()}  # drawn in the space's order
    sent_b, sent_a = plan.factors["q"]
    target = sent_b.double() @ sent_a.double() + noised["product::q"] / c.lora_scale
    assert int(torch.linalg.matrix_rank(target)) == 10
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    product = new["lora_B::q"].double() @ new["lora_A::q"].double()
    assert new["lora_B::q"].shape == (12, 2)
    torch.testing.assert_close(product, best, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[HEAD].double(), previous[HEAD].double() + noised[HEAD], atol=1e-6, rtol=0)


def test_an_update_outside_the_space_is_refused_by_name():
    with pytest.raises(ValueError, match=r"update part 'x' of shape \(2,\) is not in the space \(\(3,\)\)"):
        dp.noised_mean([{"x": torch.zeros(2)}], {"x": (3,)}, dp.Mechanism(1.0, 1.0, 1.0), torch.Generator())


def test_epsilon_is_the_rdp_bound_of_the_gaussian_mechanism_by_hand():
    """q = 1 (every node, every round): T rounds of z have RDP T·a/(2 z^2) at order a; Opacus converts it with
    eps = rdp - (log delta + log a)/(a - 1) + log((a - 1)/a) (Balle et al. 2020), minimised over the orders."""
    z, rounds, delta = 1.3, 5, 1e-5
    by_hand = min(rounds * a / (2 * z * z) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
                  for a in accounting.ORDERS)
    assert accounting.epsilon(z, 1.0, rounds, delta) == pytest.approx(by_hand, rel=1e-9)


def test_epsilon_bounds_the_exact_privacy_curve_of_the_gaussian_mechanism_from_above():
    """T Gaussian releases of multiplier z are one of multiplier z / sqrt(T), whose exact delta(eps) is
    Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), s = z / sqrt(T) (Balle & Wang 2018). The accountant's epsilon
    must be at least the exact one (it is an upper bound) and not far above it."""
    z, rounds, delta = 2.0, 8, 1e-5
    s = z / math.sqrt(rounds)
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    exact_delta = lambda eps: phi(1 / (2 * s) - eps * s) - math.exp(eps) * phi(-1 / (2 * s) - eps * s)  # noqa: E731
    low, high = 0.0, 50.0
    for _ in range(200):
        low, high = (low, (low + high) / 2) if exact_delta((low + high) / 2) < delta else ((low + high) / 2, high)
    ours = accounting.epsilon(z, 1.0, rounds, delta)
    assert high <= ours <= 1.25 * high, (high, ours)


def test_sampling_costs_less_epsilon_and_the_chosen_noise_spends_the_target():
    assert accounting.epsilon(1.0, 0.05, 12, 1e-5) < accounting.epsilon(1.0, 1.0, 12, 1e-5)
    assert accounting.epsilon(1.0, 0.05, 0, 1e-5) == 0.0
    z = accounting.noise_multiplier_for(3.0, 0.05, 12, 1e-5)
    assert 2.98 <= accounting.epsilon(z, 0.05, 12, 1e-5) <= 3.0
    assert accounting.epsilon(0.97 * z, 0.05, 12, 1e-5) > 3.0
    assert accounting.default_delta(2) == 1e-5 and accounting.default_delta(10**6) == pytest.approx(10**-6.6)


def test_a_run_whose_rounds_would_spend_more_than_its_target_stops_before_its_first_round():
    c = RunConfig.from_mapping({"num-server-rounds": 6, "dp-noise-multiplier": 1.0, "dp-target-epsilon": 5.0,
                                "fraction-train": 0.5})
    fits = max(t for t in range(1, 7) if accounting.epsilon(1.0, 0.5, t, 1e-5) <= 5.0)
    assert fits == 1  # 1 round spends 3.89, 2 rounds 5.38
    message = rf"6 rounds .* spend epsilon = [\d.]+, above dp-target-epsilon = 5; at most {fits} rounds"
    with pytest.raises(accounting.PrivacyBudgetError, match=message):
        PrivateRounds(c).start(connected=10)


def test_the_mechanism_is_resolved_once_and_a_checkpoint_keeps_it():
    c = RunConfig.from_mapping({"num-server-rounds": 6, "dp-target-epsilon": 4.0, "fraction-train": 0.5})
    rounds = PrivateRounds(c)
    rounds.start(connected=10)
    assert rounds.population == 10 and rounds.delta == 1e-5 and rounds.mechanism.expected_nodes == 5.0
    assert rounds.epsilon(6) <= 4.0 and rounds.epsilon(3) < rounds.epsilon(6)
    resumed = PrivateRounds(c)
    resumed.load_state_dict(rounds.state_dict())
    resumed.start(connected=3)  # nodes come and go: the run keeps its population, so m stays fixed
    assert resumed.state_dict() == rounds.state_dict() and resumed.mechanism == rounds.mechanism


def test_nodes_are_poisson_sampled_and_noised_from_secret_randomness():
    """Two runs of the same config, with every seedable generator seeded alike, sample other nodes and draw other
    noise; the noise's generator holds more seed than anyone could try (torch's CPU generator keeps 32 bits)."""
    config = RunConfig.from_mapping({"dp-noise-multiplier": 1.0, "fraction-train": 0.05})
    nodes, draws = list(range(10_000)), []
    for _ in range(2):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        rounds = PrivateRounds(config)
        rounds.population = len(nodes)
        draws.append((rounds.sample(nodes), rounds.generator.standard_normal(4).tolist()))
        assert rounds.generator.bit_generator.seed_seq.entropy.bit_length() > 128
    (first, noise), (second, other_noise) = draws
    assert all(390 < len(s) < 610 for s in (first, second))  # 500 expected, 5 standard deviations either way
    assert first != second and noise != other_noise and set(first) <= set(nodes)


@pytest.mark.parametrize("key, value, message", [
    ("dp-clip", 0.0, "dp-clip = 0.0 is not allowed; it must be > 0"),
    ("dp-target-epsilon", -1.0, "dp-target-epsilon = -1.0 is not allowed; it must be >= 0"),
    ("dp-delta", 1.0, r"dp-delta = 1.0 is not allowed; it must be in \[0, 1\)"),
])
def test_a_bad_privacy_value_is_refused_naming_it(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({key: value})


def test_privacy_is_off_by_default_and_on_with_either_key():
    assert not RunConfig().private
    assert RunConfig(dp_target_epsilon=8.0).private and RunConfig(dp_noise_multiplier=1.0).private


@pytest.mark.usefixtures("task_identity")
def test_a_private_strategy_round_drops_nothing_silently_and_accounts_every_round():
    strategy = make_strategy(dp_noise_multiplier=1.0, dp_clip=1.0, fraction_train=1.0)
    grid = FakeGrid((11, 22))
    messages = send(strategy, 1, initial(strategy), grid=grid)
    assert len(messages) == 2  # q = 1: every node
    arrays, _ = strategy.aggregate_train(1, [reply(messages[0], trained(messages[0], 1), 10)])  # one lost
    stats = strategy.rounds.current
    assert arrays is not None and (stats.replies, stats.dropped) == (1, 1)
    assert stats.dp_clipped == 1.0 and stats.dp_norm > 1.0
    assert stats.dp_epsilon == pytest.approx(accounting.epsilon(1.0, 1.0, 1, 1e-5))
    assert strategy.state_dict()["privacy"] == {"population": 2, "delta": 1e-5, "noise-multiplier": 1.0}
    send(strategy, 2, arrays, grid=grid)
    again, _ = strategy.aggregate_train(2, [])  # nobody replied: the noise is still released and accounted
    assert again is not None and strategy.rounds.current.dp_epsilon > stats.dp_epsilon
    assert not torch.equal(pl.unpack(again)["head::head.w"], pl.unpack(arrays)["head::head.w"])


def test_one_node_moves_a_full_round_by_at_most_c_over_m():
    """A full round (fedavg): the head and the backbone are clipped together; a huge reply moves the new model by
    exactly C/m, and a noised BatchNorm variance stays >= 0."""
    c = config(method="fedavg", **{"dp-noise-multiplier": 0.0})
    plan = plan_round(c, 1, {}, SHAPES)
    g = torch.Generator().manual_seed(2)
    previous = {"backbone::w": torch.randn(4, 3, generator=g), HEAD: torch.randn(2, 3, generator=g)}
    updates = [{k: size * torch.randn(v.shape, generator=g) for k, v in previous.items()} for size in (1.0, 2.0, 1e3)]
    mechanism = dp.Mechanism(clip=0.5, noise_multiplier=0.0, expected_nodes=4.0)

    def new(*replies, state=previous, z=0.0):
        noisy = dp.Mechanism(0.5, z, 4.0)
        return private_aggregate_round(c, plan, replies, state, noisy, np.random.default_rng(1))[0]

    influence = distance({k: v.double() for k, v in new(*updates).items()},
                         {k: v.double() for k, v in new(*updates[:2]).items()})
    assert influence == pytest.approx(mechanism.sensitivity, rel=1e-6)
    with_bn = {**previous, "backbone::bn.running_var": torch.full((3,), 1e-3)}
    assert float(new(state=with_bn, z=50.0)["backbone::bn.running_var"].min()) >= 0.0


@pytest.mark.usefixtures("task_identity")
def test_a_resumed_run_extended_beyond_its_target_stops_before_its_next_round():
    strategy = make_strategy(dp_target_epsilon=4.0, fraction_train=1.0)
    send(strategy, 1, initial(strategy), grid=FakeGrid((11, 22)))
    extended = make_strategy(dp_target_epsilon=4.0, fraction_train=1.0, num_server_rounds=12)
    extended.load_state_dict(strategy.state_dict())  # the mechanism planned for 6 rounds
    with pytest.raises(accounting.PrivacyBudgetError, match="12 rounds at dp-noise-multiplier"):
        send(extended, 2, initial(extended), grid=FakeGrid((11, 22)))


def test_epsilon_of_sampled_rounds_matches_an_independent_rdp_computation():
    """q < 1: the Poisson-subsampled Gaussian's RDP at an integer order a is log(A_a) / (a - 1), with
    A_a = sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 z^2)) (Mironov, Talwar & Zhang 2019, section 3.3),
    converted as Opacus converts. Over the integer orders alone it can only be at least the accountant's, which also
    searches fractional orders, and here it is within 2%."""
    z, q, rounds, delta = 1.1, 0.05, 30, 1e-5
    best = math.inf
    for a in range(2, 128):
        logs = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + (a - k) * math.log(1 - q)
                + k * math.log(q) + (k * k - k) / (2 * z * z) for k in range(a + 1)]
        top = max(logs)
        rdp = rounds * (top + math.log(sum(math.exp(x - top) for x in logs))) / (a - 1)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    ours = accounting.epsilon(z, q, rounds, delta)
    assert ours <= best <= 1.02 * ours, (ours, best)


@pytest.mark.usefixtures("task_identity")
def test_a_private_run_logs_its_epsilon_every_round_and_stays_within_its_target(run_config):
    _, rows, summary = run_server(run_config(num_server_rounds=2, run_name="private", dp_target_epsilon=8.0))
    spent = [r["dp-epsilon"] for r in rows[1:]]
    assert spent[0] < spent[1] <= 8.0 and summary["final-epsilon"] == spent[1]
    assert all(r["dp-norm"] > 0 and r["dp-clipped"] is not None for r in rows[1:] if r["replies"])
