"""Each round's reply deadline comes from the earlier rounds (a hung node cannot hold every round an hour)."""

import time
from types import SimpleNamespace

import pytest

from safedlora_app.server.round_deadline import DeadlineGrid


class Note:
    """A stand-in message (or reply): ``failed`` ones are Flower's error replies."""

    def __init__(self, name, failed=False, kind="train"):
        self.name, self.failed, self.metadata = name, failed, SimpleNamespace(message_type=kind)

    def has_error(self):
        return self.failed

    def __repr__(self):
        return self.name


A, B = Note("a"), Note("b")


class SlowGrid:
    """Replies after ``seconds`` per round, leaving out the nodes in ``hung`` (they never answer)."""

    def __init__(self):
        self.seconds, self.hung, self.timeouts, self.failing = 0.05, set(), [], False

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        if not messages:
            return []
        time.sleep(self.seconds if not self.hung else min(timeout, 0.3))
        return [Note(m.name, failed=self.failing) for m in messages if m not in self.hung]


def test_the_first_round_gets_round_timeout_and_later_ones_a_multiple_of_the_longest_full_round():
    inner = SlowGrid()
    grid = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    assert grid.get_node_ids() == [1, 2, 3]  # everything else is the Grid's own
    assert [r.name for r in grid.send_and_receive([A, B], timeout=3600.0)] == ["a", "b"]
    assert inner.timeouts == [3600.0]
    inner.seconds = 0.01
    grid.send_and_receive([A, B], timeout=3600.0)
    assert 0.15 <= inner.timeouts[1] < 1.0  # 3 x the 0.05 s round
    # A round in which node "b" hangs ends at its deadline, without "b", and does not stretch later deadlines.
    inner.hung = {B}
    assert [r.name for r in grid.send_and_receive([A, B], timeout=3600.0)] == ["a"]
    inner.hung = set()
    grid.send_and_receive([A, B], timeout=3600.0)
    assert inner.timeouts[3] == inner.timeouts[1]
    # Error replies (e.g. "Node Unavailable") are no proof that every node trained: the slow round is ignored.
    inner.seconds, inner.failing = 0.2, True
    grid.send_and_receive([A, B], timeout=3600.0)
    inner.failing = False
    grid.send_and_receive([A, B], timeout=3600.0)
    assert inner.timeouts[5] == inner.timeouts[1]
    # A resumed run starts from the checkpointed longest round instead of round-timeout.
    resumed = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    resumed.load_state_dict({"longest-round-seconds": 0.05})
    assert resumed.deadline() == pytest.approx(0.15)
    assert resumed.state_dict() == {"longest-round-seconds": 0.05}
    assert grid.send_and_receive([], timeout=3600.0) == [] and inner.timeouts[-1] == 3600.0  # empty: untouched


def test_the_deadline_stays_within_its_floor_and_cap():
    inner = SlowGrid()
    grid = DeadlineGrid(inner, cap=0.12, factor=3.0, floor=0.1)
    grid.send_and_receive([A], timeout=0.12)
    grid.send_and_receive([A], timeout=0.12)
    assert inner.timeouts == [0.12, 0.12]  # 3 x 0.05 s = 0.15 s, capped
    assert DeadlineGrid(inner, cap=5.0, factor=0.0).deadline() == 5.0  # factor 0: always the cap
    grid = DeadlineGrid(inner, cap=5.0, factor=3.0, floor=1.0)
    grid.longest = 0.01
    assert grid.deadline() == 1.0


def test_a_quick_query_or_evaluation_does_not_shorten_the_next_training_round():
    inner = SlowGrid()
    grid = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    grid.send_and_receive([Note("q", kind="query")], timeout=3600.0)  # the limits query before round 1
    grid.send_and_receive([A, B], timeout=3600.0)
    assert inner.timeouts == [3600.0, 3600.0] and grid.longest is not None
    learned = grid.longest
    inner.seconds = 0.3
    grid.send_and_receive([Note("e", kind="evaluate")], timeout=3600.0)
    assert grid.longest == learned  # evaluation uses the deadline but does not set it
