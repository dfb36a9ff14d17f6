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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LowRank:
    """``scale (b a - b0 a0)``, a d_out x d_in matrix held as its factors (references, not copies), formed only by
    :meth:`dense`: a round's replies then cost no more memory than they already take."""

    b: Tensor
    a: Tensor
    b0: Tensor
    a0: Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def stacks(self) -> tuple[Tensor, Tensor]:
        """The matrix as one product of stacked factors, float64: ``scale [b, -b0]`` times ``[a; a0]``."""
        return (torch.cat([self.b.double(), -self.b0.double()], dim=1) * self.scale,
                torch.cat([self.a.double(), self.a0.double()], dim=0))

    def squared_norm(self) -> float:
        """``||B A||_F^2 = trace((B^T B)(A A^T))`` of the stacks: two q x q products instead of the d_out x d_in
        matrix, for q = rank(b) + rank(b0)."""
        b, a = self.stacks()
        return max(float(torch.trace((b.T @ b) @ (a @ a.T))), 0.0)

    def dense(self) -> Tensor:
        b, a = self.stacks()
        return b @ a


Part = Tensor | LowRank


def product_change(b: Tensor, a: Tensor, b0: Tensor, a0: Tensor, scale: float = 1.0) -> LowRank:
    """``scale (b a - b0 a0)``: a module's weight change from its factors (see :class:`LowRank`)."""
    return LowRank(b, a, b0, a0, scale)


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
                generator: np.random.Generator) -> tuple[Iterator[tuple[str, Tensor]], list[float]]:
    """``(mean, norms)``: the clipped updates summed over ``m`` with the mechanism's noise, dense float64, one
    ``(name, tensor)`` per name of ``space``, in its order and made as it is read (a caller that uses each before the
    next holds one dense part at a time); every name gets noise, even one that no update holds, or with no update at
    all. ``norms``: each update's norm before clipping. Both are checked and computed before the first part.

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
    weights = [clip_coefficient(norm, mechanism.clip) / mechanism.expected_nodes for norm in norms]

    def parts() -> Iterator[tuple[str, Tensor]]:
        for name, shape in space.items():
            total = torch.zeros(shape, dtype=torch.float64)
            products = []
            for weight, update in zip(weights, updates):
                if isinstance(part := update.get(name), LowRank):
                    products.append((weight, part.stacks()))
                elif part is not None:
                    total.add_(part.double(), alpha=weight)
            if products:  # sum_k w_k B_k A_k as one product of the stacks
                total.add_(torch.cat([w * b for w, (b, _) in products], dim=1)
                           @ torch.cat([a for _, (_, a) in products]))
            if mechanism.noise_std > 0:  # drawn in the space's order
                total.add_(torch.from_numpy(generator.standard_normal(tuple(shape))), alpha=mechanism.noise_std)
            yield name, total

    return parts(), norms


def secret_generator() -> np.random.Generator:
    """A generator seeded with 256 bits of the operating system's randomness: the noise of a private run must not
    follow from anything a node or the public knows (the run's seed is in every node's run config), nor from a seed
    small enough to try them all (torch's CPU generator keeps 32 bits of its seed)."""
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little"))))
