"""Each round's reply deadline, from the rounds before it: a node that hangs does not hold the run for an hour.

Flower's strategy loop passes one fixed ``timeout`` to every ``send_and_receive``. A node whose SuperNode
still sends heartbeats while its ClientApp is stuck is not reported lost, so without a tighter deadline
every round would wait the whole ``round-timeout``. :class:`DeadlineGrid` wraps the Grid the strategy loop
uses and gives each round ``round-deadline-factor`` times the longest earlier round in which every node
replied (at least ``MIN_DEADLINE`` seconds, at most ``round-timeout``); the first round gets ``round-timeout``.

It also collects the replies every ``POLL_SECONDS``: Flower's own ``send_and_receive`` pulls every 3 s, so a
round whose replies are ready after 3.5 s waited until 6 s (2.05 s of every default round, docs/scale.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

MIN_DEADLINE = 60.0
#: Seconds between two pulls of the replies still missing: one small request to the SuperLink each.
POLL_SECONDS = 0.1


class DeadlineGrid:
    """``grid`` with :meth:`send_and_receive`'s timeout set per round; everything else is ``grid``'s own.

    Parameters
    ----------
    grid : Grid
        The ServerApp's Grid.
    cap : float
        ``round-timeout``: the first round's deadline and every round's largest.
    factor : float
        ``round-deadline-factor``; 0 keeps ``cap`` for every round.
    floor : float
        The smallest deadline after the first round.
    """

    def __init__(self, grid: Grid, cap: float, factor: float, floor: float = MIN_DEADLINE):
        self.grid, self.cap, self.factor, self.floor = grid, cap, factor, floor
        self.longest: float | None = None  # seconds of the longest round in which every node replied
        self.deadlines: list[float] = []

    def state_dict(self) -> dict[str, float | None]:
        """What a resumed run needs to keep the same deadlines (see :mod:`~safedlora_app.server.checkpoint`)."""
        return {"longest-round-seconds": self.longest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.longest = state.get("longest-round-seconds")  # absent in checkpoints written before it was kept

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def deadline(self) -> float:
        if not self.factor or self.longest is None:
            return self.cap
        return min(self.cap, max(self.floor, self.factor * self.longest))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:  # e.g. a round without federated evaluation
            return []
        # A shorter timeout of the caller's wins: the limits query's own deadline (dispatch.LIMITS_TIMEOUT). Flower's
        # round loop passes round-timeout, which no round's deadline exceeds.
        deadline = self.deadline() if timeout is None else min(timeout, self.deadline())
        self.deadlines.append(deadline)
        start = time.monotonic()
        replies = self._exchange(messages, start + deadline)
        training = all(m.metadata.message_type == MessageType.TRAIN for m in messages)
        if training and sum(not r.has_error() for r in replies) == len(messages):  # error replies do not count
            self.longest = max(self.longest or 0.0, time.monotonic() - start)
        return replies

    def _exchange(self, messages: list[Message], end: float) -> list[Message]:
        """Flower's ``send_and_receive`` (push, then pull until every reply is in or ``end`` passes), pulling
        every ``POLL_SECONDS``. The replies come in the order of the messages: arrival order would change the
        order of the aggregation's sums, and the SVD's signs, from run to run."""
        # A message the SuperLink refused gets no id (Flower logs it): there is no reply to wait for.
        order = {message_id: i for i, message_id in enumerate(self.grid.push_messages(messages)) if message_id}
        pending = set(order)
        replies: list[Message] = []
        while True:
            arrived = list(self.grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not pending or time.monotonic() >= end:
                return sorted(replies, key=lambda m: order.get(m.metadata.reply_to_message_id, len(order)))
            time.sleep(POLL_SECONDS)
