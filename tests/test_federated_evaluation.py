"""Federated evaluation: the held-out split, the keys, and the strategy's evaluation round with hand-made
replies (the ClientApp's evaluate handler on the real model: ``test_in_process``)."""

import math

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from support.strategy import evaluate_round, evaluation_reply, initial, make_strategy, reply, send, trained

from safedlora_app.core import payload as pl
from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.seeds import holdout_split
from safedlora_app.server.outputs import RoundLog
from safedlora_app.server.replies import evaluation_problem

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


def test_holdout_split_is_disjoint_complete_and_fixed():
    train, held = holdout_split(20, 0.25, seed=7)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert (train, held) == holdout_split(20, 0.25, seed=7) != holdout_split(20, 0.25, seed=8)
    assert holdout_split(5, 0.0, seed=7) == ([0, 1, 2, 3, 4], [])
    assert len(holdout_split(3, 0.01, seed=7)[1]) == 1  # at least one row held out
    with pytest.raises(ValueError, match="1 row"):
        holdout_split(1, 0.5, seed=7)


@pytest.mark.parametrize("overrides, message", [
    ({"fraction-evaluate": 1.5}, "fraction-evaluate = 1.5 is not allowed; it must be in [0, 1]"),
    ({"eval-fraction": 0.0}, "eval-fraction = 0.0 is not allowed; it must be in (0, 1)"),
    ({"eval-fraction": 1}, "eval-fraction = 1.0 is not allowed; it must be in (0, 1)"),
])
def test_bad_evaluation_keys_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping(overrides)


@pytest.mark.parametrize("connected, fraction, expected", [(10, 0.0, 0), (10, 0.05, 1), (10, 0.5, 5), (3, 1.0, 3)])
def test_evaluators_per_round(connected, fraction, expected):
    assert RunConfig(fraction_evaluate=fraction).evaluators_per_round(connected) == expected


def test_evaluation_round_weights_nodes_by_rows_and_drops_bad_replies():
    strategy = make_strategy(fraction_evaluate=1.0)
    strategy.rounds = RoundLog()
    arrays = initial(strategy)
    sent = send(strategy, 1, arrays)
    new, _ = strategy.aggregate_train(1, [reply(m, trained(m, i)) for i, m in enumerate(sent)])
    messages = evaluate_round(strategy, 1, new, (11, 22, 33, 44))
    assert [m.metadata.dst_node_id for m in messages] == [11, 22, 33, 44]
    # Every node gets the model after round 1: the aggregated factors at round 1's ranks, not revived ones.
    config = messages[0].content["config"]
    assert config["kind"] == "lora" and dict(zip(config["lora-modules"], config["lora-ranks"])) == \
        strategy.rounds.current.ranks
    assert messages[0].metadata.message_type == "evaluate"
    replies = [evaluation_reply(messages[0], 30, 0.6, 0.5, 0.9),
               evaluation_reply(messages[1], 10, 1.0, 1.0, 0.1),
               evaluation_reply(messages[2], 10, 1.5, 0.5, 0.9),  # accuracy out of range: dropped
               Message(Error(code=0, reason="boom"), reply_to=messages[3])]
    metrics = strategy.aggregate_evaluate(1, replies)
    stats = strategy.rounds.current
    assert math.isclose(stats.fed_accuracy, (30 * 0.6 + 10 * 1.0) / 40)
    assert math.isclose(stats.fed_macro_f1, (30 * 0.5 + 10 * 1.0) / 40)
    assert math.isclose(stats.fed_loss, (30 * 0.9 + 10 * 0.1) / 40)
    assert (stats.eval_nodes, stats.eval_replies, stats.eval_dropped, stats.eval_rows) == (4, 2, 2, 40)
    assert stats.eval_bytes_down == sum(m.content["arrays"].count_bytes() for m in messages)
    assert metrics["fed-accuracy"] == stats.fed_accuracy


def test_no_evaluation_when_off_or_in_a_round_eval_every_skips():
    strategy = make_strategy()  # fraction-evaluate = 0
    strategy.rounds = RoundLog()
    arrays = initial(strategy)
    send(strategy, 1, arrays)
    assert evaluate_round(strategy, 1, arrays, (11, 22)) == [] and strategy.aggregate_evaluate(1, []) is None
    strategy = make_strategy(fraction_evaluate=0.5, eval_every=2, num_server_rounds=8)
    strategy.rounds = RoundLog()
    send(strategy, 1, arrays)
    assert evaluate_round(strategy, 1, arrays, (11, 22)) == []  # round 1 of 8 is not evaluated
    send(strategy, 2, arrays)
    assert len(evaluate_round(strategy, 2, arrays, (11, 22))) == 1


def test_a_node_that_lacks_the_trained_backbone_gets_it_with_the_evaluation():
    strategy = make_strategy(init_trainable="full", fraction_evaluate=1.0, min_nodes=1)
    strategy.rounds = RoundLog()
    arrays = initial(strategy)
    sent = send(strategy, 1, arrays)  # a full round: the backbone trains
    full = {k: v + 1 for k, v in pl.unpack(sent[0].content["arrays"]).items()}
    new, _ = strategy.aggregate_train(1, [reply(m, pl.pack(full)) for m in sent])
    messages = evaluate_round(strategy, 1, new, (11, 22))
    assert messages[0].content["config"]["kind"] == "full"  # no LoRA yet: the whole trained model
    sent = send(strategy, 2, new, nodes=(11,))
    lora, _ = strategy.aggregate_train(2, [reply(m, trained(m, 0)) for m in sent])  # node 11 now holds it
    messages = evaluate_round(strategy, 2, lora, (11, 22))
    has_backbone = [any(k.startswith("backbone::") for k in m.content["arrays"]) for m in messages]
    assert has_backbone == [False, True] and strategy.rounds.current.backbone_sends == 2
    strategy.aggregate_evaluate(2, [evaluation_reply(messages[0], 5, 0.5, 0.5, 1.0),
                                    evaluation_reply(messages[1], 5, 0.5, 0.5, 1.0, backbone_hash="other")])
    assert strategy.rounds.current.eval_dropped == 1 and 22 not in strategy.node_backbone


@pytest.mark.parametrize("metrics, problem", [
    ({"num-examples": 4, "accuracy": 0.5, "macro-f1": 0.4, "loss": 0.7}, None),
    ({"num-examples": 0, "accuracy": 0.5, "macro-f1": 0.4, "loss": 0.7}, "num-examples = 0 is outside"),
    ({"num-examples": 4, "accuracy": float("nan"), "macro-f1": 0.4, "loss": 0.7}, "accuracy = nan"),
    ({"num-examples": 4, "accuracy": 0.5, "macro-f1": -0.1, "loss": 0.7}, "macro-f1 = -0.1"),
    ({"num-examples": 4, "accuracy": 0.5, "macro-f1": 0.4, "loss": float("inf")}, "loss = inf"),
    ({"num-examples": 4, "accuracy": 0.5, "macro-f1": 0.4}, "loss = None"),
])
def test_evaluation_problem(metrics, problem):
    found = evaluation_problem(RecordDict({"metrics": MetricRecord(metrics)}), max_num_examples=100)
    assert found == problem if problem is None else problem in found
