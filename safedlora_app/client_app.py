"""ClientApp: fine-tune on the node's data as the server's round config says, reply with the update
(:mod:`safedlora_app.client.rounds`), and tell the server the node's limits.

The training code (torch, transformers, peft: about 4 s and 460 MB to import) loads when a round needs it. The
server asks every connected node for its limits once, and a node answers that in a process of about 70 MB: what
decides how many SuperNodes one machine, or one small board, can host (docs/scale.md).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from safedlora_app.core.config import RunConfig, node_max_rank, node_name
from safedlora_app.core.records import LIMITS

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """One round of local training."""
    from safedlora_app.client.rounds import train_reply  # the training code, loaded once per process
    return train_reply(msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Federated evaluation: the round's global model on this node's held-out rows (never trained on)."""
    from safedlora_app.client.rounds import evaluate_reply
    return evaluate_reply(msg, context)


@app.query()
def limits_handler(msg: Message, context: Context) -> Message:
    """The node's declared limits (``max-rank``, 0 = none; see :func:`node_max_rank`) and its stable ``name``
    (:func:`node_name`), asked once by the server."""
    max_rank = node_max_rank(context.node_config, RunConfig.from_mapping(context.run_config))
    limits = ConfigRecord({"max-rank": max_rank, "name": node_name(context.node_config)})
    return Message(content=RecordDict({LIMITS: limits}), reply_to=msg)
