"""Validation of client replies before they touch the global model or the logged metrics.

The server trusts nothing a reply says about itself. Each array is decoded once, from its own bytes, and what the
bytes hold (shape, type, length, finiteness) is compared with what the node was sent; the aggregation then uses
exactly the arrays that were checked, never the labels on them. A malformed training reply (wrong keys, arrays
other than what the node was sent, non-finite values, an absurd ``num-examples``, a backbone other than the one the
node was told to use, arrays in another type than the ``wire-dtype`` its message announced) is dropped with a
reason; the round aggregates the rest. So is an evaluation reply whose metrics are missing or out of range, and a
reply whose checking raises anything at all: no content of a reply can stop the round.
"""

from __future__ import annotations

import io
import math
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from numpy.lib import format as npy

from safedlora_app.core.payload import num_parameters
from safedlora_app.core.records import ARRAYS, METRICS, NODE

from .aggregation import finite_value

#: The serialisation Flower's ``Array`` uses for NumPy arrays (``flwr.app``'s ``SType.NUMPY``).
NUMPY_STYPE = "numpy.ndarray"
#: Readers of the npy header versions ``np.save`` writes for a numeric array.
NPY_HEADERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}


class ReplyError(ValueError):
    """What makes a reply unusable; its message is the reason the server logs."""


class Accepted(NamedTuple):
    """A reply that passed its checks."""

    node_id: int
    content: RecordDict
    checked: Any
    """What the check made of the content (a training reply: its tensors, decoded from the checked arrays): what
    aggregation uses."""


@dataclass
class Screened:
    """One round's replies sorted out: valid contents by node, dropped ones with their reason, silent nodes."""

    valid: list[Accepted] = field(default_factory=list)
    dropped: list[tuple[int, str, bool]] = field(default_factory=list)
    """``(node id, reason, failed)``: ``failed`` for an error reply (the node, or Flower for it, reported one)."""
    lost: list[int] = field(default_factory=list)
    """Nodes sent a message that did not reply before the round's deadline."""
    bytes_up: int = 0
    params_up: int = 0
    """Values in the arrays of the valid replies (whose checks compared each array's labels with its bytes)."""


def screen(sent: Sequence[Message], replies: Sequence[Message], check: Callable[[Message, RecordDict], Any]
           ) -> Screened:
    """Check every reply with ``check(message it answers, content)`` (e.g. :func:`checked_update`, bound to what the
    message sent) or :func:`checked_evaluation`, which returns what it made of a sound content and raises for an
    unusable one.

    Any exception a check raises drops that reply, with the exception as its reason: a reply's content, whatever
    it holds, never ends the round. Replies are matched to the messages they answer: Flower's error reply for an
    unreachable node comes from the SuperLink, not from the node (message ids exist once the Grid has pushed the
    messages). A reply that answers no message of the round, or a message already answered, is dropped, so that
    no node counts twice.
    """
    by_id = {m.metadata.message_id: m for m in sent}
    out = Screened()
    answered: set[str] = set()
    for reply in replies:
        message = by_id.get(reply.metadata.reply_to_message_id)
        node_id = message.metadata.dst_node_id if message else reply.metadata.src_node_id
        if reply.has_error():
            out.dropped.append((node_id, f"failed: {reply.error.reason}", True))
            continue
        try:
            if isinstance(arrays := reply.content.get(ARRAYS), ArrayRecord):
                out.bytes_up += arrays.count_bytes()  # the bytes that arrived, whatever they hold
            if message is None:
                raise ReplyError("answers no message of this round")
            if message.metadata.message_id in answered:
                raise ReplyError("a second reply to the same message")
            answered.add(message.metadata.message_id)
            checked = check(message, reply.content)
            values = num_parameters(arrays) if isinstance(arrays, ArrayRecord) else 0
        except Exception as error:  # noqa: BLE001 -- whatever a reply holds, it may only cost its own place
            reason = str(error) if isinstance(error, ReplyError) else f"{type(error).__name__}: {error}"
            out.dropped.append((node_id, reason, False))
            continue
        out.params_up += values
        out.valid.append(Accepted(node_id, reply.content, checked))
    answered_nodes = {accepted.node_id for accepted in out.valid} | {node for node, _, _ in out.dropped}
    out.lost = sorted({m.metadata.dst_node_id for m in sent} - answered_nodes)
    return out


def checked_update(content: RecordDict, expected_shapes: Mapping[str, tuple[int, ...]], wire_dtype: str, *,
                   max_num_examples: int, backbone_hash: str | None = None) -> dict[str, np.ndarray]:
    """A training reply's arrays, each decoded once from its own bytes and checked (:func:`decoded`).

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    expected_shapes : mapping
        Wire key to shape: exactly what the node must return (the ranks it was sent: ``lora::packed`` holds
        ``payload.packed_size`` of them).
    wire_dtype : str
        The ``wire-dtype`` the message announced: every array must hold values of this type.
    max_num_examples : int
        Upper bound for ``num-examples``; larger values are absurd.
    backbone_hash : str, optional
        When given, the node must report training on this backbone (``node`` ConfigRecord).

    Returns
    -------
    dict
        Wire key to the values the reply holds (read-only arrays over its bytes), in the reply's key order.

    Raises
    ------
    ReplyError
        Naming the first problem found.
    """
    arrays = content.get(ARRAYS)
    metrics = content.get(METRICS)
    if not isinstance(arrays, ArrayRecord):
        raise ReplyError(f"no ArrayRecord under {ARRAYS!r}")
    if not isinstance(metrics, MetricRecord):
        raise ReplyError(f"no MetricRecord under {METRICS!r}")
    _raise(_examples_problem(metrics, max_num_examples))
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    if missing or extra:
        raise ReplyError(f"wrong keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    values = {name: decoded(name, array, expected_shapes[name], wire_dtype) for name, array in arrays.items()}
    _raise(_backbone_problem(content, backbone_hash))
    return values


def decoded(name: str, array: Array, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The values ``array`` holds, read from its bytes: their npy header must announce ``shape`` and ``dtype``,
    the bytes after it must be exactly that many values, all finite, and the Array's own ``shape`` and ``dtype``
    fields must say the same.

    The header is read and checked before anything is allocated (``np.load`` would first allocate whatever a
    header announces), and the values are a read-only view of the bytes, not a copy.

    Raises
    ------
    ReplyError
        Naming ``name``, what it holds and what was expected.
    """
    if array.stype != NUMPY_STYPE:
        raise ReplyError(f"{name} is serialised as {array.stype!r}, expected {NUMPY_STYPE!r}")
    data = array.data
    buffer = io.BytesIO(data)
    try:
        version = npy.read_magic(buffer)
        held_shape, fortran_order, held_dtype = NPY_HEADERS[version](buffer)
    except (ValueError, KeyError) as error:  # KeyError: a header version np.save does not write for numbers
        raise ReplyError(f"{name} holds no readable npy array ({type(error).__name__}: {error})") from error
    if held_shape != tuple(shape):
        raise ReplyError(f"{name} holds shape {held_shape}, expected {tuple(shape)}")
    if held_dtype != np.dtype(dtype):  # a byte order other than the machine's too
        raise ReplyError(f"{name} has dtype {held_dtype}, the round's wire-dtype is {dtype}")
    count = math.prod(held_shape)
    if len(data) - buffer.tell() != count * held_dtype.itemsize:
        raise ReplyError(f"{name} holds {len(data) - buffer.tell()} bytes of values, its shape {held_shape} of "
                         f"{dtype} needs {count * held_dtype.itemsize}")
    if tuple(array.shape) != held_shape or array.dtype != dtype:
        raise ReplyError(f"{name} is labelled {array.dtype} {tuple(array.shape)} but holds {dtype} {held_shape}")
    values = np.frombuffer(data, dtype=held_dtype, count=count, offset=buffer.tell())
    values = values.reshape(held_shape, order="F" if fortran_order else "C")
    if not np.isfinite(values).all():
        raise ReplyError(f"{name} holds NaN or inf")
    return values


#: The range of each held-out metric an evaluation reply may report.
METRIC_RANGES = {"accuracy": (0.0, 1.0), "macro-f1": (0.0, 1.0), "loss": (0.0, math.inf), "perplexity": (1.0, math.inf)}


def evaluation_problem(content: RecordDict, *, max_num_examples: int, backbone_hash: str | None = None,
                       metrics_needed: Sequence[str] = ("accuracy", "macro-f1", "loss")) -> str | None:
    """Why an evaluation reply cannot be counted, or ``None``: it must report its rows (``num-examples``) and each
    of ``metrics_needed`` (the task's ``TaskSpec.eval_metrics``), finite and in its :data:`METRIC_RANGES`, in a
    MetricRecord under ``metrics``."""
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        return f"no MetricRecord under {METRICS!r}"
    if problem := _examples_problem(metrics, max_num_examples):
        return problem
    for name in metrics_needed:
        low, high = METRIC_RANGES[name]
        value = metrics.get(name)
        if finite_value(value) is None or not low <= value <= high:
            return f"{name} = {reprlib.repr(value)} is not a number in [{low:g}, {high:g}]"
    return _backbone_problem(content, backbone_hash)


def checked_evaluation(content: RecordDict, **limits: Any) -> None:
    """:func:`evaluation_problem` (``limits`` are its keywords) as a check for :func:`screen`: raises
    :class:`ReplyError` with the problem."""
    _raise(evaluation_problem(content, **limits))


def _raise(problem: str | None) -> None:
    if problem:
        raise ReplyError(problem)


def _examples_problem(metrics: MetricRecord, max_num_examples: int) -> str | None:
    num_examples = metrics.get("num-examples")
    if finite_value(num_examples) is None or num_examples != int(num_examples):
        # reprlib: a node may send an int of any length, and the reason goes to the log.
        return f"num-examples = {reprlib.repr(num_examples)} is not a whole number"
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
