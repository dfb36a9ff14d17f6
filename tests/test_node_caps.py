"""Per-node rank caps (node-config ``max-rank``) on tiny shapes with hand-made replies: what a capped node is
sent and may return, and that the global adapter still reaches the uncapped ranks."""

import pytest
import torch
from flwr.app import Error, Message
from support.strategy import MODULES, FakeGrid, initial, make_strategy, received, reply, send, trained

from safedlora_app.core import payload as pl
from safedlora_app.core.config import ConfigError, RunConfig, node_max_rank
from safedlora_app.server.dispatch import LIMITS_TIMEOUT

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True])
def test_a_bad_max_rank_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"node-config max-rank = .* is not allowed; it must be a whole number >= 1"):
        node_max_rank({"max-rank": value})


def test_max_rank_values():
    assert node_max_rank({}) == 0 and node_max_rank({"max-rank": 2}) == 2 and node_max_rank({"max-rank": 3.0}) == 3


def test_a_simulated_partition_takes_its_cap_from_partition_max_rank_and_node_config_wins():
    config = RunConfig.from_mapping({"partition-max-rank": "2, 0,4"})
    assert [node_max_rank({"partition-id": p}, config) for p in range(5)] == [2, 0, 4, 0, 0]
    assert node_max_rank({"partition-id": 0, "max-rank": 3}, config) == 3
    assert node_max_rank({}, config) == 0 and node_max_rank({"partition-id": 0}) == 0


@pytest.mark.parametrize("value", ["2,two", "2,-1", "2,,2", "1.5"])
def test_a_bad_partition_max_rank_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"partition-max-rank = .* is not allowed; give whole numbers >= 0"):
        RunConfig.from_mapping({"partition-max-rank": value})


def two_rounds_with_a_capped_node(aggregation="product"):
    """Round 1 trains both nodes; round 2's messages. Node 22 declares max-rank 2; rank-max is 4."""
    strategy = make_strategy(aggregation=aggregation, heat_rounds=2)
    grid = FakeGrid((11, 22), caps={22: 2})
    first = send(strategy, 1, initial(strategy), grid=grid)
    updates = [trained(first[0], 1), trained(first[1], 2)]
    arrays, _ = strategy.aggregate_train(1, [reply(first[0], updates[0], 30), reply(first[1], updates[1], 10)])
    return strategy, grid, first, updates, arrays


def test_a_capped_node_receives_and_returns_only_its_ranks_and_the_global_adapter_keeps_the_others():
    strategy, grid, first, updates, arrays = two_rounds_with_a_capped_node()
    uncapped, capped = (m.content["config"] for m in first)
    assert uncapped["lora-ranks"] == [4, 4] and capped["lora-ranks"] == [2, 2]
    assert strategy.rounds.current.capped == 1
    assert first[1].content["arrays"].count_bytes() < first[0].content["arrays"].count_bytes()
    assert pl.packed_size({"m0": 2, "m1": 2}, MODULES) == pl.unpack(first[1].content["arrays"])[pl.PACKED].numel()
    # Exact aggregation of a rank-4 and a rank-2 reply: the weighted mean of their products, at rank 4.
    new = pl.unpack(arrays)
    for m in MODULES:
        dense = sum(w * (u[f"lora_B::{m}"].double() @ u[f"lora_A::{m}"].double())
                    for w, u in zip((0.75, 0.25), updates))
        got = new[f"lora_B::{m}"].double() @ new[f"lora_A::{m}"].double()
        assert new[f"lora_A::{m}"].shape[0] == torch.linalg.matrix_rank(got) == min(4, *MODULES[m])
        tail = torch.linalg.svdvals(dense)[4:]
        assert torch.linalg.matrix_norm(dense - got) ** 2 == pytest.approx(float((tail ** 2).sum()), abs=1e-4)
    # Round 2: the capped node gets the best rank-2 approximation of each module (SVD form: its first two
    # components); the limits were asked once per node.
    second = send(strategy, 2, arrays, grid=grid)
    full, cut = received(second[0]), received(second[1])
    for m in MODULES:
        b, a = full[f"lora_B::{m}"].double(), full[f"lora_A::{m}"].double()
        best = torch.linalg.svdvals(b @ a)[2:]
        got = cut[f"lora_B::{m}"].double() @ cut[f"lora_A::{m}"].double()
        assert cut[f"lora_A::{m}"].shape[0] == 2
        assert torch.linalg.matrix_norm(b @ a - got) ** 2 == pytest.approx(float((best ** 2).sum()), abs=1e-6)
    assert grid.queries == 2


def test_a_capped_node_that_returns_the_uncapped_ranks_is_dropped():
    strategy = make_strategy()
    messages = send(strategy, 1, initial(strategy), grid=FakeGrid((11, 22), caps={22: 2}))
    wrong = reply(messages[1], trained(messages[0], 3))  # rank-4 factors from the node capped at 2
    _, metrics = strategy.aggregate_train(1, [reply(messages[0], trained(messages[0], 1)), wrong])
    assert strategy.rounds.current.dropped == 1 and metrics["num-examples"] == 10


def test_factor_averaging_pads_a_capped_reply_with_the_components_it_was_not_sent():
    strategy, _, first, updates, arrays = two_rounds_with_a_capped_node(aggregation="factors")
    new = pl.unpack(arrays)
    capped, sent = pl.lora_factors(updates[1]), pl.lora_factors(received(first[0]))  # node 22's rank 2; rank 4
    for m in MODULES:
        b, a = sent[m][0].clone(), sent[m][1].clone()
        b[:, :2], a[:2] = capped[m]
        assert torch.allclose(new[f"lora_B::{m}"], 0.75 * updates[0][f"lora_B::{m}"] + 0.25 * b, atol=1e-6)
        assert torch.allclose(new[f"lora_A::{m}"], 0.75 * updates[0][f"lora_A::{m}"] + 0.25 * a, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["product", "factors"])
def test_a_capped_node_that_does_not_train_leaves_the_global_adapter_unchanged(aggregation):
    """Issue #36: with zero padding, one node of two capped at rank 2 halved every component above its cap in
    every round (singular values 8, 7, 6, ... became 8, 7, 3, ... after one round). Nodes that return what they
    were sent (a learning rate of zero) must leave the global adapter's singular values as they were."""
    strategy = make_strategy(aggregation=aggregation, schedule="constant", heat_rounds=0, cool_rounds=0)
    grid = FakeGrid((11, 22), caps={22: 2})
    first = send(strategy, 1, initial(strategy), grid=grid)
    arrays, _ = strategy.aggregate_train(1, [reply(m, trained(m, seed), 10) for seed, m in enumerate(first)])

    def spectrum(arrays):
        factors = pl.lora_factors(pl.unpack(arrays))
        return {m: torch.linalg.svdvals(b.double() @ a.double()) for m, (b, a) in factors.items()}

    before = spectrum(arrays)
    assert all(int((s > 1e-6).sum()) == 4 for m, s in before.items() if min(MODULES[m]) >= 4)
    for server_round in (2, 3, 4):
        messages = send(strategy, server_round, arrays, grid=grid)
        arrays, _ = strategy.aggregate_train(server_round, [reply(m, received(m), 10) for m in messages])
        for m, values in spectrum(arrays).items():
            assert torch.allclose(values, before[m], atol=1e-5), (server_round, m, values, before[m])


def test_a_node_that_cannot_report_its_limits_is_treated_as_uncapped_and_asked_again(caplog):
    class Silent(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            self.queries += len(messages)
            return []

    strategy, grid = make_strategy(), Silent((11, 22))
    messages = send(strategy, 1, initial(strategy), grid=grid)
    assert [m.content["config"]["lora-ranks"] for m in messages] == [[4, 4], [4, 4]]
    send(strategy, 2, initial(strategy), grid=grid)
    assert grid.queries == 4


def test_a_node_the_superlink_reports_unavailable_is_named_in_the_warning(caplog):
    """Flower's error reply for a node that missed its heartbeats comes from the SuperLink (node 1), as seen with
    50 SuperNodes on 2 cores (docs/scale.md): the warning must name the node the query went to."""
    class OneUnavailable(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            lost = messages[1]
            error = Message(Error(code=0, reason="Node Unavailable"), reply_to=lost)
            error.metadata.__dict__["_src_node_id"] = 1  # what the SuperLink's error reply carries
            return [replies[0], error]

    strategy = make_strategy()
    send(strategy, 1, initial(strategy), grid=OneUnavailable((11, 22)))
    assert "node 22 did not report its limits (Node Unavailable)" in caplog.text
    assert "node 1 did not" not in caplog.text


class AnsweringOnly(FakeGrid):
    """Only the nodes in ``answering`` answer the limits query in time; every timeout asked for is recorded."""

    def __init__(self, nodes, answering, caps=None):
        super().__init__(nodes, caps)
        self.answering, self.timeouts = set(answering), []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = super().send_and_receive(messages, timeout=timeout)
        return [r for r in replies if r.metadata.src_node_id in self.answering]


@pytest.mark.parametrize("round_timeout, deadline", [(3600.0, LIMITS_TIMEOUT), (30.0, 30.0)])
def test_the_limits_query_has_its_own_short_deadline_and_a_node_that_misses_it_is_asked_again(
        round_timeout, deadline, caplog):
    """Issue #37 §2: the query waited the round's round-timeout (3600 s by default) for a node that does not
    answer. A node that misses the query's deadline counts as uncapped (as a failed answer does): the round goes
    on, and it is asked again before the next LoRA round."""
    strategy = make_strategy(round_timeout=round_timeout)
    grid = AnsweringOnly((11, 22), answering={11}, caps={11: 2, 22: 2})
    messages = send(strategy, 1, initial(strategy), grid=grid)
    assert grid.timeouts == [deadline] and LIMITS_TIMEOUT < 3600.0
    assert f"round 1: node(s) [22] did not answer the limits query within {deadline:g} s" in caplog.text
    assert [m.content["config"]["lora-ranks"] for m in messages] == [[2, 2], [4, 4]]
    grid.answering.add(22)
    messages = send(strategy, 2, initial(strategy), grid=grid)
    assert grid.queries == 3 and [m.content["config"]["lora-ranks"] for m in messages] == [[2, 2], [2, 2]]
