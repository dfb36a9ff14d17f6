"""Validation of client replies before they touch the global model or the logged metrics.

A malformed training reply (wrong keys, shapes other than what the node was sent, non-finite values,
an absurd ``num-examples``, a backbone other than the one the node was told to use, arrays in another
type than the ``wire-dtype`` its message announced) is dropped with a reason; the round aggregates the
rest. So is an evaluation reply whose metrics are missing or out of range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from safedlora_app.core.checks import is_number
from safedlora_app.core.payload import num_parameters
from safedlora_app.core.records import ARRAYS, METRICS, NODE


@dataclass
class Screened:
    """One round's replies sorted out: valid contents by node, dropped ones with their reason, silent nodes."""

    valid: list[tuple[int, RecordDict]] = field(default_factory=list)
    dropped: list[tuple[int, str, bool]] = field(default_factory=list)
    """``(node id, reason, failed)``: ``failed`` for an error reply (the node, or Flower for it, reported one)."""
    lost: list[int] = field(default_factory=list)
    """Nodes sent a message that did not reply before the round's deadline."""
    bytes_up: int = 0
    params_up: int = 0


def screen(sent: Sequence[Message], replies: Sequence[Message], problem: Callable[[int, RecordDict], str | None]
           ) -> Screened:
    """Check every reply with ``problem(node id, content)`` (:func:`reply_problem` or :func:`evaluation_problem`,
    bound to what that node was sent), which returns why a content is unusable or ``None``, and then with
    :func:`wire_dtype_problem` against the message it answers.

    Replies are matched to the messages they answer: Flower's error reply for an unreachable node comes from the
    SuperLink, not from the node (message ids exist once the Grid has pushed the messages).
    """
    by_id = {m.metadata.message_id: m for m in sent}
    out = Screened()
    for reply in replies:
        message = by_id.get(reply.metadata.reply_to_message_id)
        node_id = message.metadata.dst_node_id if message else reply.metadata.src_node_id
        content = None if reply.has_error() else reply.content
        if content is not None and isinstance(arrays := content.get(ARRAYS), ArrayRecord):
            out.bytes_up += arrays.count_bytes()
            out.params_up += num_parameters(arrays)
        reason = (f"failed: {reply.error.reason}" if content is None
                  else problem(node_id, content) or wire_dtype_problem(content, message))
        if reason:
            out.dropped.append((node_id, reason, content is None))
        else:
            out.valid.append((node_id, content))
    answered = {node for node, _ in out.valid} | {node for node, _, _ in out.dropped}
    out.lost = sorted({m.metadata.dst_node_id for m in sent} - answered)
    return out


def wire_dtype_problem(content: RecordDict, message: Message | None) -> str | None:
    """Why a reply's arrays are not all of the ``wire-dtype`` that ``message`` (the one it answers) announced, or
    ``None``; also ``None`` for a reply without arrays (evaluation), or one that answers no known message
    (``problem`` judges that).

    A node that answers in another type does not run the server's protocol (another app version), and its
    bytes would not be what the round's accounting assumes.
    """
    arrays = content.get(ARRAYS)
    if message is None or not isinstance(arrays, ArrayRecord):
        return None
    announced = message.content["config"]["wire-dtype"]
    wrong = next(((name, array.dtype) for name, array in arrays.items() if array.dtype != announced), None)
    return f"{wrong[0]} has dtype {wrong[1]}, the round's wire-dtype is {announced}" if wrong else None


def reply_problem(content: RecordDict, expected_shapes: Mapping[str, tuple[int, ...]], *,
                  max_num_examples: int, backbone_hash: str | None = None) -> str | None:
    """Why a reply's content cannot be aggregated, or ``None`` when it is sound.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    expected_shapes : mapping
        Wire key to shape: exactly what the node must return (the ranks it was sent).
    max_num_examples : int
        Upper bound for ``num-examples``; larger values would let one client dominate.
    backbone_hash : str, optional
        When given, the node must report training on this backbone (``node`` ConfigRecord).
    """
    arrays = content.get(ARRAYS)
    metrics = content.get(METRICS)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord under {ARRAYS!r}"
    if not isinstance(metrics, MetricRecord):
        return f"no MetricRecord under {METRICS!r}"
    if problem := _examples_problem(metrics, max_num_examples):
        return problem
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for name, shape in expected_shapes.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(shape):
            return f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if array.dtype not in ("float32", "float16", "float64"):
            return f"{name} has dtype {array.dtype}, expected a float type"
        if not np.isfinite(array.numpy()).all():
            return f"{name} holds NaN or inf"
    return _backbone_problem(content, backbone_hash)


#: The range of each held-out metric an evaluation reply may report.
METRIC_RANGES = {"accuracy": (0.0, 1.0), "macro-f1": (0.0, 1.0), "loss": (0.0, math.inf), "perplexity": (1.0, math.inf)}


def evaluation_problem(content: RecordDict, *, max_num_examples: int, backbone_hash: str | None = None,
                       metrics_needed: Sequence[str] = ("accuracy", "macro-f1", "loss")) -> str | None:
    """Why an evaluation reply cannot be counted, or ``None``: it must report its rows (``num-examples``) and each
    of ``metrics_needed`` (the task's ``config.EVAL_METRICS``), finite and in its :data:`METRIC_RANGES`, in a
    MetricRecord under ``metrics``."""
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        return f"no MetricRecord under {METRICS!r}"
    if problem := _examples_problem(metrics, max_num_examples):
        return problem
    for name in metrics_needed:
        low, high = METRIC_RANGES[name]
        value = metrics.get(name)
        if not is_number(value) or not low <= value <= high or not math.isfinite(value):
            return f"{name} = {value!r} is not a number in [{low:g}, {high:g}]"
    return _backbone_problem(content, backbone_hash)


def _examples_problem(metrics: MetricRecord, max_num_examples: int) -> str | None:
    num_examples = metrics.get("num-examples")
    if not is_number(num_examples) or not math.isfinite(num_examples) or num_examples != int(num_examples):
        return f"num-examples = {num_examples!r} is not a whole number"
    if not 0 < num_examples <= max_num_examples:
        return f"num-examples = {num_examples!r} is outside 1..{max_num_examples}"
    return None


def _backbone_problem(content: RecordDict, backbone_hash: str | None) -> str | None:
    if backbone_hash is None:
        return None
    node = content.get(NODE)
    reported = node.get("backbone-hash") if isinstance(node, ConfigRecord) else None
    if reported != backbone_hash:
        return f"used backbone {str(reported)[:12]!r}, expected {backbone_hash[:12]!r}"
    return None
