"""A private run's mechanism and ledger: who trains each round, how much noise, and the epsilon spent so far.

Resolved at the run's first round, when the nodes are known: the population N (the nodes connected then), delta
(``dp-delta``, else ``accounting.default_delta(N)``) and the noise multiplier (``dp-noise-multiplier``, else the
accountant's for ``dp-target-epsilon`` over ``num-server-rounds``). A checkpoint keeps the three, so a resumed run
goes on with the same mechanism, and a resumed run extended beyond its target stops before its first round.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.supercore import log

from safedlora_app.core import accounting
from safedlora_app.core import privacy as dp
from safedlora_app.core.config import RunConfig


class PrivateRounds:
    """The Poisson sampling, the Gaussian mechanism and the accountant of a run with ``config.private``.

    The sampling and the noise draw from the operating system's randomness, not from the run's seed: every node
    receives the run config, and privacy amplification by sampling holds only while the sample is secret. A private
    run's choice of nodes and its noise are therefore not reproducible; its data, partitions and initialisation are.
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.population: int | None = None
        self.delta: float | None = None
        self.noise_multiplier: float | None = None
        self.generator = dp.secret_generator()
        self._sampler = random.SystemRandom()
        self._checked = self._warned = False

    @property
    def sample_rate(self) -> float:
        """q: each node's chance of training in a round (``fraction-train``)."""
        return self.config.fraction_train

    def start(self, connected: int) -> None:
        """Resolve the mechanism (at the run's first round) and check that the run's rounds fit its target, once
        per process: a resumed run checks its (possibly raised) ``num-server-rounds`` too.

        Raises
        ------
        accounting.PrivacyBudgetError
            When the run's rounds would spend more than ``dp-target-epsilon``.
        """
        if self._checked:
            return
        c = self.config
        if self.population is None:
            self.population = connected
            self.delta = c.dp_delta or accounting.default_delta(connected)
            self.noise_multiplier = c.dp_noise_multiplier or accounting.noise_multiplier_for(
                c.dp_target_epsilon, self.sample_rate, c.num_server_rounds, self.delta)
        total = accounting.check_budget(self.noise_multiplier, self.sample_rate, c.num_server_rounds, self.delta,
                                        c.dp_target_epsilon)
        self._checked = True
        log(INFO, "differential privacy (client-level): each of the %d nodes trains with probability q = %g a round "
            "(m = %.1f expected); updates clipped to dp-clip = %g, noise multiplier z = %.4g (std %.3g on the mean); "
            "%d rounds spend epsilon = %.3f at delta = %.3g (RDP accountant)", self.population, self.sample_rate,
            self.mechanism.expected_nodes, c.dp_clip, self.noise_multiplier, self.mechanism.noise_std,
            c.num_server_rounds, total, self.delta)

    @property
    def mechanism(self) -> dp.Mechanism:
        """Clip C, noise multiplier z and the fixed denominator m = q N."""
        return dp.Mechanism(self.config.dp_clip, self.noise_multiplier, self.sample_rate * self.population)

    def sample(self, node_ids: list[int]) -> list[int]:
        """Poisson sampling: each node independently with probability q (possibly none). Warns once when the
        connected nodes differ from the population by more than a tenth: m = q N no longer matches the round."""
        if abs(len(node_ids) - self.population) > 0.1 * self.population and not self._warned:
            self._warned = True
            log(WARNING, "differential privacy: %d nodes are connected, against the %d of the run's first round that "
                "fixed m = %.1f; the mean is scaled by the first round's N (set min-nodes to the federation's size so "
                "that the first round waits for it)", len(node_ids), self.population, self.mechanism.expected_nodes)
        return [n for n in node_ids if self._sampler.random() < self.sample_rate]

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` private rounds."""
        return accounting.epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"population": self.population, "delta": self.delta, "noise-multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.population, self.delta = state["population"], state["delta"]
        self.noise_multiplier = state["noise-multiplier"]
