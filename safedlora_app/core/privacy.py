"""Client-level differential privacy's arithmetic: each node's update clipped, a fixed-weight mean, Gaussian noise.

One round of DP-FedAvg (McMahan et al., ICLR 2018), in the space where a method's aggregation is linear, so that
what comes after the noise is post-processing:

1. each node's update ``u_k`` (a mapping of named parts; a part is a dense tensor or a :class:`LowRank` product);
2. clipped: scaled by ``min(1, C / ||u_k||)``, ``||.||`` the L2 norm over every part;
3. summed and divided by ``m``, the *expected* number of sampled nodes, fixed in advance: one node moves the mean
   by at most ``C / m`` whatever it sends or whoever else replies, and a node that does not reply adds zero;
4. Gaussian noise of standard deviation ``z C / m`` added to every coordinate of the mean.

The caller then post-processes the noised mean (SA-FedLoRA truncates each module's dense mean by SVD). Pure tensor
functions (no Flower, no I/O); the accountant that turns ``z`` into epsilon is :mod:`~safedlora_app.core.accounting`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LowRank:
    """The ``d_out x d_in`` matrix ``b @ a`` (``b``: d_out x q, ``a``: q x d_in), formed only by :meth:`dense`."""

    b: Tensor
    a: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def squared_norm(self) -> float:
        """``||b a||_F^2 = trace((b^T b)(a a^T))``: two q x q products instead of the d_out x d_in matrix."""
        b, a = self.b.double(), self.a.double()
        return max(float(torch.trace((b.T @ b) @ (a @ a.T))), 0.0)

    def dense(self) -> Tensor:
        return self.b.double() @ self.a.double()


Part = Tensor | LowRank


def product_change(b: Tensor, a: Tensor, b0: Tensor, a0: Tensor, scale: float = 1.0) -> LowRank:
    """``scale (b a - b0 a0)`` as one low-rank product of stacked factors, ``scale [b, -b0] [a; a0]``: its norm
    costs (r + r0)^2 numbers, whatever the module's size."""
    return LowRank(torch.cat([b.double(), -b0.double()], dim=1) * scale, torch.cat([a.double(), a0.double()], dim=0))


def squared_norm(part: Part) -> float:
    return part.squared_norm() if isinstance(part, LowRank) else float(part.double().pow(2).sum())


def update_norm(update: Mapping[str, Part]) -> float:
    """The L2 norm of a whole update: every part's entries as one vector."""
    return math.sqrt(sum(squared_norm(part) for part in update.values()))


def clip_coefficient(norm: float, clip: float) -> float:
    """``min(1, clip / norm)``: the factor that brings an update of L2 norm ``norm`` to at most ``clip``."""
    return 1.0 if norm <= clip else clip / norm


@dataclass(frozen=True)
class Mechanism:
    """The Gaussian mechanism of one round: clip ``C``, noise multiplier ``z``, expected number of nodes ``m``.

    Raises
    ------
    ValueError
        For a clip or expected number of nodes that is not > 0, or a negative noise multiplier.
    """

    clip: float
    noise_multiplier: float
    expected_nodes: float

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.expected_nodes > 0 and self.noise_multiplier >= 0):
            raise ValueError(f"need clip > 0, expected_nodes > 0 and noise_multiplier >= 0, got clip={self.clip}, "
                             f"expected_nodes={self.expected_nodes}, noise_multiplier={self.noise_multiplier}")

    @property
    def sensitivity(self) -> float:
        """The most one node can move the mean (L2): ``C / m``."""
        return self.clip / self.expected_nodes

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on every coordinate of the mean: ``z C / m``."""
        return self.noise_multiplier * self.sensitivity


def noised_mean(updates: Sequence[Mapping[str, Part]], space: Mapping[str, tuple[int, ...]], mechanism: Mechanism,
                generator: np.random.Generator) -> tuple[dict[str, Tensor], list[float]]:
    """``(mean, norms)``: the clipped updates summed over ``m`` with the mechanism's noise, dense float64, one tensor
    per name of ``space`` (every name gets noise, even one that no update holds, or with no update at all); and each
    update's norm before clipping.

    Raises
    ------
    ValueError
        For an update holding a name outside ``space`` or a part of another shape.
    """
    for update in updates:
        for name, part in update.items():
            if tuple(part.shape) != tuple(space.get(name, ())):
                raise ValueError(f"update part {name!r} of shape {tuple(part.shape)} is not in the space "
                                 f"({tuple(space[name]) if name in space else 'no such name'})")
    norms = [update_norm(update) for update in updates]
    mean = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in space.items()}
    products: dict[str, tuple[list[Tensor], list[Tensor]]] = {}  # name -> the weighted b's and the a's
    for update, norm in zip(updates, norms):
        weight = clip_coefficient(norm, mechanism.clip) / mechanism.expected_nodes
        for name, part in update.items():
            if isinstance(part, LowRank):
                bs, as_ = products.setdefault(name, ([], []))
                bs.append(part.b.double() * weight)
                as_.append(part.a.double())
            else:
                mean[name].add_(part.double(), alpha=weight)
    for name, (bs, as_) in products.items():  # sum_k w_k b_k a_k as one product of the stacks
        mean[name].add_(torch.cat(bs, dim=1) @ torch.cat(as_, dim=0))
    if mechanism.noise_std > 0:  # drawn in the space's order
        for total in mean.values():
            total.add_(torch.from_numpy(generator.standard_normal(tuple(total.shape))), alpha=mechanism.noise_std)
    return mean, norms


def secret_generator() -> np.random.Generator:
    """A generator seeded with 256 bits of the operating system's randomness: the noise of a private run must not
    follow from anything a node or the public knows (the run's seed is in every node's run config), nor from a seed
    small enough to try them all (torch's CPU generator keeps 32 bits of its seed)."""
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little"))))
