"""What each sampled node is sent, and asking a node for its limits (no strategy state, no aggregation).

A LoRA round's payload is the round plan cut to the node's ``max-rank``, plus the trained backbone for a node
that does not hold it yet. Nodes that need the same ranks and backbone share one ``ArrayRecord``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from safedlora_app.core import payload as pl
from safedlora_app.core.checks import is_integer
from safedlora_app.core.records import ARRAYS, CONFIG, LIMITS
from safedlora_app.core.round_plan import FULL, RoundPlan


class Sent(NamedTuple):
    """What one node was sent."""

    plan: RoundPlan
    """The round's plan, cut to the node's ``max-rank``."""
    reply_shapes: dict[str, tuple[int, ...]]
    """``{wire key: shape}`` that the node's reply must have."""


@dataclass(frozen=True)
class Recipients:
    """The nodes a round's messages go to, and what the server knows of them."""

    node_ids: list[int]
    caps: Mapping[int, int]
    """Node id -> its ``max-rank`` (0 or absent: no cap)."""
    backbones: Mapping[int, str]
    """Node id -> the hash of the trained backbone it holds."""


@dataclass(frozen=True)
class Wire:
    """How a run encodes its messages (the same in every round)."""

    expected_full: Mapping[str, tuple[int, ...]]
    """``{wire key: shape}`` of a full fine-tuning reply."""
    lora_scale: float
    dtype: str
    """``wire-dtype``: the float type of what messages carry (LoRA factors, head, a full round's model) and of
    the replies; the trained backbone of a LoRA round excepted (float32: the tensors its hash is of)."""


@dataclass(frozen=True)
class Dispatch:
    """The messages of one round (training or evaluation), and what each node's reply must look like."""

    plan: RoundPlan
    messages: list[Message]
    per_node: dict[int, Sent]
    """Node id -> what it was sent."""
    backbone_hash: str
    """The trained backbone's hash the nodes must confirm; '' for the pre-trained one."""

    def traffic(self) -> tuple[int, int, int]:
        """``(bytes, parameters, backbone sends)`` of the messages sent down."""
        records = [m.content[ARRAYS] for m in self.messages]
        sends = sum(1 for r in records if self.backbone_hash and any(k.startswith(pl.BACKBONE + pl.SEP) for k in r))
        return sum(r.count_bytes() for r in records), sum(pl.num_parameters(r) for r in records), sends

    @property
    def capped(self) -> int:
        """Nodes sent lower ranks than the round's plan, because of their ``max-rank``."""
        return sum(1 for node in self.per_node.values() if node.plan is not self.plan)


def dispatch(plan: RoundPlan, tensors: Mapping[str, torch.Tensor], arrays: ArrayRecord, config: ConfigRecord,
             message_type: str, to: Recipients, wire: Wire) -> Dispatch:
    """The plan's payload to every node of ``to`` in ``wire.dtype``, cut to its cap, with the trained backbone
    (float32) for the nodes whose backbone hash differs (once per node).

    ``tensors`` is ``arrays`` unpacked: the global state, float32.
    """
    if plan.kind == FULL:
        # One record for every node; the global record is float32 already, so at float32 it goes as it is.
        record = arrays if wire.dtype == "float32" else pl.pack(tensors, wire.dtype)
        round_config = plan.round_config(wire.lora_scale, wire.dtype, config.get("label-names", [])).to_record()
        messages = [Message(content=RecordDict({ARRAYS: record, CONFIG: round_config}), message_type=message_type,
                            dst_node_id=n) for n in to.node_ids]
        return Dispatch(plan, messages, {n: Sent(plan, dict(wire.expected_full)) for n in to.node_ids}, "")
    backbone = pl.of_kind(tensors, pl.BACKBONE)
    # What the node hashes on arrival (bare parameter names); '' = the pre-trained backbone.
    backbone_hash = pl.tensors_hash(pl.bare(tensors, pl.BACKBONE)) if backbone else ""
    payloads: dict[tuple, tuple[RoundPlan, ArrayRecord, dict]] = {}  # by (ranks, with backbone)
    messages, sent = [], {}
    for node_id in to.node_ids:
        node_plan = plan.capped(to.caps.get(node_id, 0))
        send_backbone = bool(backbone) and to.backbones.get(node_id) != backbone_hash
        key = (tuple(node_plan.ranks.values()), send_backbone)
        if key not in payloads:
            factors = node_plan.lora_payload(tensors)
            # The backbone stays float32, sent once: the node trains on exactly what the server evaluates and
            # hashed, and its hash check needs no knowledge of the wire.
            record = ArrayRecord({**pl.pack(factors, wire.dtype), **(pl.pack(backbone) if send_backbone else {})})
            payloads[key] = (node_plan, record, {k: tuple(v.shape) for k, v in factors.items()})
        node_plan, record, expected = payloads[key]
        round_config = node_plan.round_config(wire.lora_scale, wire.dtype, config.get("label-names", []), backbone_hash)
        content = RecordDict({ARRAYS: record, CONFIG: round_config.to_record()})
        messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        sent[node_id] = Sent(node_plan, expected)
    return Dispatch(plan, messages, sent, backbone_hash)


#: Seconds the server waits for the nodes' answers to its limits query (at most ``round-timeout``). The query is
#: light (the ClientApp imports no training code for it), but a node starts a ClientApp process to answer: the
#: slowest answer seen took about 50 s (an emulated arm64 node, docs/edge-devices.md).
LIMITS_TIMEOUT = 120.0


class NodeLimits(NamedTuple):
    """What a node reports once, when the server first asks (its reply to a query message)."""

    max_rank: int
    """The largest LoRA rank per module it trains; 0 = no cap."""
    name: str
    """A name that stays the same across processes and runs ('' = none): the server samples by it."""


def ask_limits(grid: Grid, node_ids: list[int], server_round: int, timeout: float) -> dict[int, NodeLimits]:
    """``{node id: NodeLimits}`` of the nodes that answer a query message soundly within ``timeout`` seconds; the
    others (a bad or failed answer, or none in time) are logged and left out, so that they count as uncapped and
    unnamed, and are asked again next time."""
    queries = [Message(content=RecordDict({CONFIG: ConfigRecord({"server-round": server_round})}),
                       message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    replies = grid.send_and_receive(queries, timeout=timeout)
    # After the exchange: message ids exist once the Grid has pushed the messages, and Flower's error reply for an
    # unreachable node comes from the SuperLink (src_node_id 1), so only the id names the node (as in replies.screen).
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in queries}
    limits, answered = {}, set()
    for reply in replies:
        node_id = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node_id)
        record = None if reply.has_error() else reply.content.get(LIMITS)
        cap = record.get("max-rank") if isinstance(record, ConfigRecord) else None
        if is_integer(cap) and cap >= 0:
            name = record.get("name", "")
            limits[node_id] = NodeLimits(cap, name if isinstance(name, str) else "")
        else:
            log(WARNING, "round %d: node %d did not report its limits (%s); sent uncapped ranks", server_round,
                node_id, reply.error.reason if reply.has_error() else f"limits {record!r}")
    if silent := sorted(set(node_ids) - answered):
        log(WARNING, "round %d: node(s) %s did not answer the limits query within %g s; sent uncapped ranks",
            server_round, silent, timeout)
    if capped := {n: lim.max_rank for n, lim in limits.items() if lim.max_rank}:
        log(INFO, "round %d: node max-rank caps %s", server_round, capped)
    return limits
