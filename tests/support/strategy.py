"""A SAFedLoRA strategy on tiny shapes, its messages and hand-made replies (no model, no Flower runtime)."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.round_plan import initial_tensors
from safedlora_app.server.strategy import SAFedLoRA

MODULES = {"m0": (6, 4), "m1": (5, 3)}
HEAD = {"head.w": (2, 3)}
BACKBONE = {"emb.w": (4, 3)}


class FakeGrid:
    """Connected nodes that answer the server's query for their limits with ``caps`` (node -> max-rank) and
    ``names`` (node -> the name it reports; none by default)."""

    def __init__(self, nodes, caps=None, names=None):
        self.nodes, self.caps, self.names, self.queries = nodes, dict(caps or {}), dict(names or {}), 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            assert message.metadata.message_type == "query"
            message.metadata.__dict__["_message_id"] = message.object_id
            self.queries += 1
            node = message.metadata.dst_node_id
            limits = ConfigRecord({"max-rank": self.caps.get(node, 0), **({"name": self.names[node]}
                                                                           if node in self.names else {})})
            replies.append(Message(RecordDict({"limits": limits}), reply_to=message))
        return replies


def make_strategy(**overrides):
    values = dict(num_server_rounds=6, init_rounds=1, heat_rounds=1, cool_rounds=1, rank_max=4, rank_min=1,
                  rank_floor=1, min_nodes=2, schedule="linear", wire_dtype="float32",  # exact factors on the wire
                  eval_every=1)
    values.update(overrides)
    config = RunConfig(**values)
    config.validate()
    expected_full = {**{f"head::{n}": s for n, s in HEAD.items()}, **{f"backbone::{n}": s for n, s in BACKBONE.items()}}
    return SAFedLoRA(config.effective, MODULES, expected_full)


def initial(strategy):
    state = {pl.key(pl.HEAD, "head.w"): torch.ones(2, 3), pl.key(pl.BACKBONE, "emb.w"): torch.zeros(4, 3)}
    return pl.pack(initial_tensors(strategy.config, state))


def send(strategy, server_round, arrays, nodes=(11, 22), grid=None):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"label-names": ["a", "b"]}),
                                             grid or FakeGrid(nodes)))
    for message in messages:  # what the Grid does when it pushes
        message.metadata.__dict__["_message_id"] = message.object_id
    return messages


def reply(message, tensors, num_examples=10, backbone_hash=None, extra=None):
    config = message.content["config"]
    node = ConfigRecord({"backbone-hash": config.get("backbone-hash", "") if backbone_hash is None else backbone_hash})
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "train-time": 2.0,
                            "peak-memory-mb": 100.0, **(extra or {})})
    record = tensors if isinstance(tensors, ArrayRecord) else pl.pack(pl.to_wire(tensors, modules_of(message)))
    return Message(RecordDict({"arrays": record, "metrics": metrics, "node": node}), reply_to=message)


def modules_of(message):
    return list(message.content["config"].get("lora-modules", []))


def received(message):
    """What a node reads from a message: the packed factors split at the round's ranks."""
    config = message.content["config"]
    ranks = dict(zip(modules_of(message), config.get("lora-ranks", [])))
    return pl.from_wire(pl.unpack(message.content["arrays"]), ranks, MODULES)


def trained(message, seed):
    """A plausible update: every received tensor plus seeded noise, at exactly the sent shapes."""
    g = torch.Generator().manual_seed(seed)
    received_tensors = received(message)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in received_tensors.items()
            if not k.startswith(pl.BACKBONE)}


def noisy(message, seed):
    """A full round's reply: an update of every tensor it sent (backbone included), seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in received(message).items()}


def evaluation_reply(message, rows, accuracy, f1, loss, backbone_hash=None):
    node = ConfigRecord({"backbone-hash": message.content["config"].get("backbone-hash", "")
                         if backbone_hash is None else backbone_hash})
    metrics = MetricRecord({"num-examples": rows, "accuracy": accuracy, "macro-f1": f1, "loss": loss})
    return Message(RecordDict({"metrics": metrics, "node": node}), reply_to=message)


def evaluate_round(strategy, server_round, arrays, nodes):
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({"label-names": ["a", "b"]}),
                                                FakeGrid(nodes)))
    for message in messages:
        message.metadata.__dict__["_message_id"] = message.object_id
    return messages
