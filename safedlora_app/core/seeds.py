"""Reproducible randomness: one seed per (run seed, round, node, ...) and seeded sampling."""

from __future__ import annotations

from enum import IntEnum

import torch


class Stream(IntEnum):
    """A node's independent random streams in one round: the last value given to :func:`mix_seed` after the run
    seed, the round and the partition (the rows a node draws use no stream value). The values are part of every
    stored run's result: never renumber them."""

    TRAINING = 1
    """The training loop (batch order)."""
    INITIALISATION = 2
    """torch's global RNG before training (LoRA dropout)."""
    HOLDOUT = 3
    """The rows held out for federated evaluation (mixed with the partition only, not the round)."""
    DROPOUT = 4
    """Whether the node fails its round (``sim-dropout``)."""


class Draw(IntEnum):
    """The server's independent draws of nodes in one round (the last value given to :func:`mix_seed`)."""

    TRAIN = 0
    EVALUATE = 1


def mix_seed(*values: int) -> int:
    """One deterministic seed from several integers (run seed, round, partition, ...)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + int(value)) % (2**63 - 1)
    return seed


def sample_indices(size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``range(size)`` (all of them when count is 0 or too large)."""
    if count <= 0 or count >= size:
        return list(range(size))
    return sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def holdout_split(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held out)`` indices of ``range(size)``: ``round(fraction * size)`` rows (at least 1) held out
    by a seeded permutation, the rest for training; with ``fraction`` 0, every row trains.

    Raises
    ------
    ValueError
        When ``size`` is too small to leave a row on each side.
    """
    if fraction <= 0:
        return list(range(size)), []
    held = max(1, round(fraction * size))
    if held >= size:
        raise ValueError(f"{size} row(s) cannot be split into training rows and {held} held-out row(s)")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])
