"""Each round's reply deadline comes from the earlier rounds (a hung node cannot hold every round an hour)."""

import time
from types import SimpleNamespace

import pytest

from safedlora_app.server.round_deadline import DeadlineGrid


class Note:
    """A stand-in message (or reply): ``failed`` ones are Flower's error replies."""

    def __init__(self, name, failed=False, kind="train", reply_to=""):
        self.name, self.failed = name, failed
        self.metadata = SimpleNamespace(message_type=kind, message_id=f"id-{name}", reply_to_message_id=reply_to)

    def has_error(self):
        return self.failed

    def __repr__(self):
        return self.name


A, B = Note("a"), Note("b")


class SlowGrid:
    """A Grid whose nodes reply ``seconds`` after a push, leaving out the nodes in ``hung`` (they never answer)."""

    def __init__(self):
        self.seconds, self.hung, self.failing, self.pulls, self.delays = 0.05, set(), False, [], {}
        self._pending = {}  # message id -> (message, when its reply is ready)

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        now = time.monotonic()
        self._pending.update({m.metadata.message_id: (m, now + self.delays.get(m.name, self.seconds))
                              for m in messages if m not in self.hung})
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        self.pulls.append(time.monotonic())
        now, replies = time.monotonic(), []
        for message_id in list(message_ids):
            if message_id in self._pending and self._pending[message_id][1] <= now:
                message, _ = self._pending.pop(message_id)
                replies.append(Note(message.name, failed=self.failing, reply_to=message_id))
        return replies


def test_the_first_round_gets_round_timeout_and_later_ones_a_multiple_of_the_longest_full_round():
    inner = SlowGrid()
    inner.seconds = 0.15  # collected by the pull at about 0.2 s; the later rounds' replies by the one at 0.1 s
    grid = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    assert grid.get_node_ids() == [1, 2, 3]  # everything else is the Grid's own
    assert [r.name for r in grid.send_and_receive([A, B], timeout=3600.0)] == ["a", "b"]
    assert grid.deadlines == [3600.0]
    inner.seconds = 0.01
    grid.send_and_receive([A, B], timeout=3600.0)
    assert 0.45 <= grid.deadlines[1] < 1.5  # 3 x the first round (about 0.2 s), far below the cap
    # A round in which node "b" hangs ends at its deadline, without "b", and does not stretch later deadlines.
    inner.hung = {B}
    assert [r.name for r in grid.send_and_receive([A, B], timeout=3600.0)] == ["a"]
    inner.hung = set()
    grid.send_and_receive([A, B], timeout=3600.0)
    assert grid.deadlines[3] == grid.deadlines[1]
    # Error replies (e.g. "Node Unavailable") are no proof that every node trained: the slow round is ignored.
    inner.seconds, inner.failing = 0.2, True
    grid.send_and_receive([A, B], timeout=3600.0)
    inner.failing = False
    grid.send_and_receive([A, B], timeout=3600.0)
    assert grid.deadlines[5] == grid.deadlines[1]
    # A resumed run starts from the checkpointed longest round instead of round-timeout.
    resumed = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    resumed.load_state_dict({"longest-round-seconds": 0.05})
    assert resumed.deadline() == pytest.approx(0.15)
    assert resumed.state_dict() == {"longest-round-seconds": 0.05}
    count = len(grid.deadlines)
    assert grid.send_and_receive([], timeout=3600.0) == [] and len(grid.deadlines) == count  # empty: untouched


def test_the_deadline_stays_within_its_floor_and_cap():
    inner = SlowGrid()
    grid = DeadlineGrid(inner, cap=0.12, factor=3.0, floor=0.1)
    grid.send_and_receive([A], timeout=0.12)
    grid.send_and_receive([A], timeout=0.12)
    assert grid.deadlines == [0.12, 0.12]  # 3 x 0.05 s = 0.15 s, capped
    assert DeadlineGrid(inner, cap=5.0, factor=0.0).deadline() == 5.0  # factor 0: always the cap
    grid = DeadlineGrid(inner, cap=5.0, factor=3.0, floor=1.0)
    grid.longest = 0.01
    assert grid.deadline() == 1.0


def test_a_quick_query_or_evaluation_does_not_shorten_the_next_training_round():
    inner = SlowGrid()
    grid = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    grid.send_and_receive([Note("q", kind="query")], timeout=3600.0)  # the limits query before round 1
    grid.send_and_receive([A, B], timeout=3600.0)
    assert grid.deadlines == [3600.0, 3600.0] and grid.longest is not None
    learned = grid.longest
    inner.seconds = 0.3
    grid.send_and_receive([Note("e", kind="evaluate")], timeout=3600.0)
    assert grid.longest == learned  # evaluation uses the deadline but does not set it


def test_replies_are_collected_as_they_arrive_not_every_3_seconds_and_kept_in_message_order():
    inner = SlowGrid()
    inner.delays = {"a": 0.35, "b": 0.05}  # b replies first
    grid = DeadlineGrid(inner, cap=3600.0, factor=3.0, floor=0.01)
    started = time.monotonic()
    assert [r.name for r in grid.send_and_receive([A, B], timeout=3600.0)] == ["a", "b"]  # the messages' order
    # Flower's own loop pulls again after 3 s; here a pull follows every POLL_SECONDS.
    assert time.monotonic() - started < 2.0
    assert max(later - earlier for earlier, later in zip(inner.pulls, inner.pulls[1:])) < 1.0
    assert len(inner.pulls) >= 3


def test_a_shorter_timeout_of_the_caller_wins_so_that_the_limits_query_keeps_its_own_deadline():
    """Issue #37: the limits query waited the round's deadline (3,600 s in round 1) for a lost message."""
    inner = SlowGrid()
    asked, hung = Note("asked", kind="query"), Note("hung", kind="query")
    inner.hung = {hung}
    grid = DeadlineGrid(inner, cap=3.0, factor=3.0, floor=0.01)  # cap: round-timeout
    start = time.monotonic()
    assert [r.name for r in grid.send_and_receive([asked, hung], timeout=0.3)] == ["asked"]
    assert time.monotonic() - start < 1.0 and grid.deadlines == [0.3]
    assert grid.longest is None  # a query teaches the round deadline nothing
    grid.send_and_receive([Note("a")], timeout=3.0)  # Flower's round loop passes round-timeout: the round's own
    assert grid.deadlines[1] == 3.0
