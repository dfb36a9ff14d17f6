"""The privacy accountant of a private run: Opacus's RDP accountant, pinned, not written here.

Every round samples each node independently with probability q (``fraction-train``: Poisson sampling, which the
accountant assumes) and releases the round's mean update with Gaussian noise of multiplier z
(:mod:`~safedlora_app.core.privacy`): the Poisson-subsampled Gaussian mechanism, composed over the rounds in Rényi
DP (Mironov 2017; Mironov, Talwar & Zhang 2019) under add/remove-one-node adjacency, and converted to
(epsilon, delta)-DP. The unit of privacy is a node: everything it holds. Opacus is imported only by private runs.
"""

from __future__ import annotations

#: Rényi orders searched for the tightest conversion: Opacus's defaults (1.1 to 63), then larger ones, which runs
#: with little noise or few rounds need (Opacus warns when its best order is its largest).
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 256, 8)) + [256, 512, 1024]


class PrivacyBudgetError(ValueError):
    """A private run whose rounds would spend more than its ``dp-target-epsilon``."""


def default_delta(nodes: int) -> float:
    """``min(1e-5, N^-1.1)``: below 1/N, so that the guarantee does not allow one node's data to leak outright."""
    return min(1e-5, max(nodes, 1) ** -1.1)


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon spent by ``rounds`` rounds at ``noise_multiplier`` and ``sample_rate``, at ``delta``."""
    if rounds <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta, alphas=ORDERS))


def noise_multiplier_for(target_epsilon: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) whose ``rounds`` rounds spend at most ``target_epsilon``.

    Raises
    ------
    PrivacyBudgetError
        When no noise multiplier up to Opacus's limit reaches the target.
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=rounds, accountant="rdp", alphas=ORDERS))
    except ValueError as error:
        raise PrivacyBudgetError(f"dp-target-epsilon = {target_epsilon:g} cannot be reached in {rounds} rounds at "
                                 f"fraction-train = {sample_rate:g} and dp-delta = {delta:g} ({error}); allow a "
                                 "larger epsilon or sample a smaller fraction") from None


def check_budget(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                 target_epsilon: float) -> float:
    """Epsilon after ``rounds`` rounds; raises when it exceeds ``target_epsilon`` (0: no target).

    Raises
    ------
    PrivacyBudgetError
        Naming the epsilon the rounds would spend and the most rounds that fit.
    """
    spent = epsilon(noise_multiplier, sample_rate, rounds, delta)
    if target_epsilon and spent > target_epsilon:
        fitting = rounds - 1
        while fitting > 0 and epsilon(noise_multiplier, sample_rate, fitting, delta) > target_epsilon:
            fitting -= 1
        raise PrivacyBudgetError(
            f"{rounds} rounds at dp-noise-multiplier = {noise_multiplier:.4g}, fraction-train = {sample_rate:g} and "
            f"dp-delta = {delta:g} spend epsilon = {spent:.3f}, above dp-target-epsilon = {target_epsilon:g}; at most "
            f"{fitting} rounds fit (set num-server-rounds to at most {fitting}, or raise the noise or the target)")
    return spent
