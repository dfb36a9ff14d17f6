"""The run's outputs: which round's model is kept as the best one, and what a round's times say (hand-made
metrics rows)."""

import logging

import pytest

from safedlora_app.server.outputs import (
    BestRound,
    RoundStats,
    RunRecorder,
    nodes_at_once,
    one_after_another,
    selection_loss,
)


def row(server_round, val_loss=None, fed_loss=None, test_loss=0.05):
    """A metrics line; the test loss is lowest everywhere, so a choice that read it would show."""
    return {"round": server_round, "val-loss": val_loss, "fed-loss": fed_loss, "loss": test_loss}


def test_the_lowest_held_out_loss_wins_and_ties_keep_the_earlier_round():
    best = BestRound()
    assert best.offer(row(1, 0.9)) and best.round == 1
    assert not best.offer(row(2, None))  # not evaluated (eval-every)
    assert best.offer(row(3, 0.7)) and (best.round, best.loss) == (3, 0.7)
    assert not best.offer(row(4, 0.8)) and not best.offer(row(5, 0.7))
    assert best.round == 3


def test_round_zero_never_counts_and_federated_loss_stands_in_for_central():
    assert selection_loss(row(2, 0.5, 0.1)) == 0.5  # central validation first
    assert selection_loss(row(2, None, 0.4)) == 0.4
    best = BestRound.of([row(0, 0.1), row(1, None, 0.6), row(2, None, 0.4), row(3, None, 0.5)])
    assert (best.round, best.loss) == (2, 0.4)


def test_a_diverged_round_never_counts():
    best = BestRound.of([row(1, 0.9), row(2, float("nan")), row(3, float("inf")), row(4, 1.0)])
    assert (best.round, best.loss) == (1, 0.9)


def test_no_evaluation_means_no_best_round():
    best = BestRound.of([row(0), row(1), row(2)])
    assert best.round is None and best.loss is None


def test_the_test_loss_never_chooses_the_best_round():
    """Issue #36: the best round's model was chosen by test loss, which made its test score a choice."""
    lines = [row(1, 0.9, test_loss=0.1), row(2, 0.5, test_loss=0.9)]
    assert BestRound.of(lines).round == 2
    assert BestRound.of([row(1, test_loss=0.1)]).round is None  # no validation: no choice


def test_nodes_at_once_is_the_nodes_summed_seconds_over_the_exchange():
    # Issue #38: 2 nodes of 5 s each in a 10.4 s exchange ran in turn; in a 5.5 s exchange, at once.
    def line(exchange):
        return {"replies": 2, "client-seconds-total": 10.0, "exchange-seconds": exchange}
    assert nodes_at_once(line(10.4)) == pytest.approx(10 / 10.4) and nodes_at_once(line(5.5)) == pytest.approx(10 / 5.5)
    assert nodes_at_once({"replies": 1, "client-seconds-total": 5.0, "exchange-seconds": 5.2}) is None
    assert nodes_at_once({"replies": 2, "client-seconds-total": None, "exchange-seconds": 5.5}) is None  # round 0
    assert nodes_at_once({"replies": 3}) is None  # a line of an older run


def test_nodes_ran_one_after_the_other_when_no_two_intervals_overlap():
    # Issue #38: one Ray actor serving both nodes in turn, against two actors at once (round 1's start-up included).
    assert one_after_another([(100.0, 105.0), (105.2, 110.0)]) is True
    assert one_after_another([(105.2, 110.0), (100.0, 105.0), (110.0, 112.0)]) is True  # in any order of replies
    assert one_after_another([(100.0, 108.0), (100.4, 107.0)]) is False
    assert one_after_another([(100.0, 110.0), (109.0, 111.0), (120.0, 121.0)]) is False  # two of three at once
    assert one_after_another([(100.0, 105.0)]) is None


def test_the_run_says_once_that_its_nodes_trained_one_after_the_other(tmp_path, caplog):
    recorder = RunRecorder(tmp_path, num_rounds=3)
    for server_round, in_turn in ((1, True), (2, True), (3, False)):
        recorder.start(RoundStats(round=server_round, stage="annealing", kind="lora", replies=2, in_turn=in_turn))
        recorder.record(server_round, None)
    hints = [r for r in caplog.records if "trained one after the other" in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelno == logging.WARNING
    assert "round 1: the 2 nodes" in hints[0].getMessage() and "client-resources-num-cpus=1" in hints[0].getMessage()


def test_nodes_that_trained_at_once_get_no_hint(tmp_path, caplog):
    recorder = RunRecorder(tmp_path, num_rounds=2)
    for server_round, in_turn in ((1, False), (2, None)):
        recorder.start(RoundStats(round=server_round, stage="annealing", kind="lora", replies=2, in_turn=in_turn))
        recorder.record(server_round, None)
    assert "one after the other" not in caplog.text
