"""One round's aggregation: the new global tensors from the valid replies, and the replies' metrics.

Pure functions (no Flower, no I/O). Full rounds average every tensor. LoRA rounds average the head,
keep the frozen backbone, and aggregate each module's factors: the exact weighted mean of the
products ``B_k A_k`` truncated to rank-max (``aggregation = "product"``), or A and B averaged
separately (``"factors"``, FedIT's way).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from safedlora_app.core import adapter_math as am
from safedlora_app.core import payload as pl
from safedlora_app.core import privacy as dp
from safedlora_app.core.checks import is_number
from safedlora_app.core.config import RunConfig
from safedlora_app.core.round_plan import FULL, RoundPlan

Tensors = Mapping[str, torch.Tensor]
REPLY_MEANS = ("train-loss", "train-time", "client-time", "first-step-a-ratio")
#: Times also reported as their largest value (``<name>-max``: the slowest node) and their sum (``<name>-total``:
#: the nodes' work, which is the exchange's length when they ran one after the other).
REPLY_EXTREMES = ("train-time", "client-time")


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k p_k x_k`` with ``p_k = w_k / sum w``, accumulated in float64, returned as float32."""
    total = float(sum(weights))
    return sum((w / total) * x.double() for w, x in zip(weights, tensors)).float()


def aggregate_round(config: RunConfig, plan: RoundPlan, received: Sequence[Tensors], weights: Sequence[float],
                    previous: Tensors) -> tuple[dict[str, torch.Tensor], dict]:
    """``(new global tensors, diagnostics)`` of a round.

    Parameters
    ----------
    config : RunConfig
        The effective run config.
    plan : RoundPlan
        The round's plan: its kind, and the factors every node started from.
    received : sequence of mapping
        Each valid reply's tensors (``lora_B``/``lora_A`` entries already split from the wire); in full rounds
        each tensor's update: the node's trained value minus the value it was sent.
    weights : sequence of float
        Each reply's ``num-examples``.
    previous : mapping
        The global tensors the round started from (the frozen backbone comes from here).

    Returns
    -------
    new, diagnostics : dict, dict
        ``diagnostics`` holds ``dropped_update`` (share of the round's mean update, squared Frobenius
        summed over modules, that truncation to rank-max dropped; ``None`` when nothing is truncated, or
        when many replies made the aggregation sketch the top components only)
        and ``factor_norms`` (``||B||`` and ``||A||`` of the first module).
    """
    if plan.kind == FULL:  # the replies are updates against what was sent (client.rounds)
        new = {k: previous[k] + weighted_mean([r[k] for r in received], weights) for k in received[0]}
        return new, {"dropped_update": None, "factor_norms": {}}
    new = pl.of_kind(previous, pl.BACKBONE)  # frozen while LoRA trains
    new.update({k: weighted_mean([r[k] for r in received], weights) for k in pl.of_kind(received[0], pl.HEAD)})
    dropped = update = 0.0
    sketched = False
    for m, (sent_b, sent_a) in plan.factors.items():
        bs = [r[pl.key(pl.LORA_B, m)] for r in received]
        as_ = [r[pl.key(pl.LORA_A, m)] for r in received]
        if plan.frozen_a:  # every node trained B against the same A: mean(B_k) A is exactly the mean of B_k A
            b, a = weighted_mean(bs, weights), sent_a
        elif config.aggregation == "product":
            b, a, module_dropped, module_update = am.aggregate_module(bs, as_, weights, (sent_b, sent_a),
                                                                      config.rank_max, config.factor_form)
            if module_dropped is None:  # sketched (many replies): the discarded tail is not computed
                sketched = True
            else:
                dropped, update = dropped + module_dropped, update + module_update
        else:
            b, a = am.aggregate_factors(bs, as_, weights)
        new[pl.key(pl.LORA_B, m)], new[pl.key(pl.LORA_A, m)] = b, a
    first = next(iter(plan.factors))
    share = None  # averaging factors never truncates an exact mean; a sketch does not compute the tail
    if config.aggregation == "product" and not sketched:
        # 9 significant digits: the tail of the singular values carries LAPACK's rounding, which was seen to differ
        # between a run and its resumption in the 15th digit; the share needs no more.
        share = float(f"{dropped / update:.9g}") if update > 0 else 0.0
    diagnostics = {
        "dropped_update": share,
        "factor_norms": {"B": float(new[pl.key(pl.LORA_B, first)].norm()),
                         "A": float(new[pl.key(pl.LORA_A, first)].norm())},
    }
    return new, diagnostics


#: The name of a module's weight change ``s (B A - B0 A0)`` in a private product round's update.
PRODUCT = "product::"


def update_space(config: RunConfig, plan: RoundPlan, previous: Tensors) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a round's updates where its aggregation is linear: those of :func:`node_update` for a
    node that returns what it was sent."""
    sent = {**pl.of_kind(previous, pl.HEAD), **(pl.of_kind(previous, pl.BACKBONE) if plan.kind == FULL else {})}
    for m, (b, a) in plan.factors.items():
        sent[pl.key(pl.LORA_B, m)], sent[pl.key(pl.LORA_A, m)] = b, a
    return {k: tuple(part.shape) for k, part in node_update(config, plan, sent, previous).items()}


def node_update(config: RunConfig, plan: RoundPlan, reply: Tensors, previous: Tensors) -> dict[str, dp.Part]:
    """One node's update where the round's aggregation is linear, so that noise added to the mean of the clipped
    updates survives the aggregation's last step as post-processing: in full rounds the reply itself (already the
    change of every tensor); in LoRA rounds the head's change, and per module the weight change
    ``s (B A - B0 A0)`` (``aggregation = "product"``, as a :class:`~safedlora_app.core.privacy.LowRank`), the
    change of B and A (``"factors"``) or of B (A frozen)."""
    if plan.kind == FULL:
        return dict(reply)
    update: dict[str, dp.Part] = {k: reply[k] - previous[k] for k in pl.of_kind(previous, pl.HEAD)}
    for m, (sent_b, sent_a) in plan.factors.items():
        kb, ka = pl.key(pl.LORA_B, m), pl.key(pl.LORA_A, m)
        if plan.frozen_a:
            update[kb] = reply[kb] - sent_b
        elif config.aggregation == "product":
            update[PRODUCT + m] = dp.product_change(reply[kb], reply[ka], sent_b, sent_a, config.lora_scale)
        else:
            update[kb], update[ka] = reply[kb] - sent_b, reply[ka] - sent_a
    return update


def private_aggregate_round(config: RunConfig, plan: RoundPlan, received: Sequence[Tensors], previous: Tensors,
                            mechanism: dp.Mechanism, generator: np.random.Generator
                            ) -> tuple[dict[str, torch.Tensor], dict]:
    """``(new global tensors, diagnostics)`` of a differentially private round (client-level, central).

    Each valid reply's update (:func:`node_update`) is clipped to ``mechanism.clip``, the clipped updates are summed
    over the expected number of nodes and noised (:func:`~safedlora_app.core.privacy.noised_mean`: the same with no
    reply at all), and the noised mean is added to what the round started from. Under product aggregation each
    module's new product ``B0 A0 + mean / s`` is then truncated to rank-max by SVD: after the noise, so it costs no
    privacy. ``diagnostics`` adds ``dp`` (the replies' median update norm and the share clipped) to
    :func:`aggregate_round`'s keys.
    """
    space = update_space(config, plan, previous)
    parts, norms = dp.noised_mean([node_update(config, plan, r, previous) for r in received], space, mechanism,
                                  generator)
    new = {} if plan.kind == FULL else pl.of_kind(previous, pl.BACKBONE)
    sent = {key: factor for m, factors in plan.factors.items()
            for key, factor in zip((pl.key(pl.LORA_B, m), pl.key(pl.LORA_A, m)), factors)}
    dropped = update = 0.0
    for name, change in parts:  # one noised part at a time: a module's dense mean lives only while it is used
        if name.startswith(PRODUCT):  # truncated after the noise: post-processing
            m = name[len(PRODUCT):]
            sent_b, sent_a = plan.factors[m]
            change /= config.lora_scale
            u, s, vh, tail = am.top_svd(sent_b.double() @ sent_a.double() + change, config.rank_max)
            new[pl.key(pl.LORA_B, m)], new[pl.key(pl.LORA_A, m)] = am.split_factors(u, s, vh, config.rank_max,
                                                                                 config.factor_form)
            dropped, update = dropped + tail, update + float(change.pow(2).sum())
        else:  # the head, A and B (factors), B (A frozen), or a full round's tensor
            new[name] = ((sent[name] if name in sent else previous[name]).double() + change).float()
            if name.endswith("running_var"):  # noise can make a BatchNorm variance negative: clamped
                new[name] = new[name].clamp_min(0.0)
    if plan.frozen_a:
        new.update({pl.key(pl.LORA_A, m): sent_a for m, (_, sent_a) in plan.factors.items()})
    diagnostics = {"dropped_update": None, "factor_norms": {}, "dp": _clip_stats(norms, mechanism.clip)}
    if plan.kind != FULL:
        first = next(iter(plan.factors))
        diagnostics["factor_norms"] = {"B": float(new[pl.key(pl.LORA_B, first)].norm()),
                                       "A": float(new[pl.key(pl.LORA_A, first)].norm())}
        if config.aggregation == "product" and not plan.frozen_a and update > 0:
            diagnostics["dropped_update"] = float(f"{dropped / update:.9g}")
    return new, diagnostics


def _clip_stats(norms: Sequence[float], clip: float) -> dict[str, float | None]:
    """The replies' median update norm before clipping, and the share of them that clipping scaled down."""
    if not norms:
        return {"norm": None, "clipped": None}
    return {"norm": statistics.median(norms), "clipped": sum(n > clip for n in norms) / len(norms)}


def reply_metrics(records: Sequence[Mapping], weights: Sequence[float]) -> dict[str, float | int]:
    """The round's training metrics: ``num-examples`` summed, means weighted by it, the largest peak memory, and
    the times' largest value and sum (``REPLY_EXTREMES``).

    A metric a reply reports as anything but a finite number (a list, NaN, an int beyond float's range) is left
    out of its mean: one node's report cannot make the round's NaN.
    """
    out: dict[str, float | int] = {"num-examples": int(sum(weights))}
    for name in REPLY_MEANS:
        values = [(w, v) for w, r in zip(weights, records) if (v := finite_value(r.get(name))) is not None]
        if values:
            out[name] = sum(w * v for w, v in values) / sum(w for w, _ in values)
            if name in REPLY_EXTREMES:
                out[f"{name}-max"], out[f"{name}-total"] = max(v for _, v in values), sum(v for _, v in values)
    peaks = [v for r in records if (v := finite_value(r.get("peak-memory-mb"))) is not None]
    if peaks:
        out["peak-memory-mb"] = max(peaks)
    return out


def finite_value(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number, else ``None`` (a bool, a list, NaN, inf, or an int
    too large for a float: ``float()`` of it raises)."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
