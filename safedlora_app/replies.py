"""Validation of client replies before they touch the global model.

A malformed reply (wrong keys, shapes other than what the node was sent, non-finite values,
an absurd ``num-examples``, a backbone other than the one the node was told to use) is
dropped with a reason; the round aggregates the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .payload import ARRAYS, METRICS, NODE


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
    num_examples = metrics.get("num-examples")
    if (isinstance(num_examples, bool) or not isinstance(num_examples, (int, float))
            or not math.isfinite(num_examples) or num_examples != int(num_examples)):
        return f"num-examples = {num_examples!r} is not a whole number"
    if not 0 < num_examples <= max_num_examples:
        return f"num-examples = {num_examples!r} is outside 1..{max_num_examples}"
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
    if backbone_hash is not None:
        node = content.get(NODE)
        reported = node.get("backbone-hash") if isinstance(node, ConfigRecord) else None
        if reported != backbone_hash:
            return f"trained on backbone {str(reported)[:12]!r}, expected {backbone_hash[:12]!r}"
    return None
