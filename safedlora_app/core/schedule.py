"""The annealing budget: total LoRA rank over all adapted modules, round by round.

Pure functions (no Flower, no I/O). Annealing step ``s = 0..R-1``: ``b_max`` while heating
(``s < H``), ``b_min`` while cooling (``s >= R - C``), and in between, with
``u = (s - H) / (R - H - C)`` in ``[0, 1)``, one of the shrink curves below.
"""

from __future__ import annotations

import math

SHRINK_CURVES = {
    # AdaLoRA's cubic: most of the drop happens early.
    "cubic": lambda u, b_max, b_min: b_min + (b_max - b_min) * (1.0 - u) ** 3,
    "linear": lambda u, b_max, b_min: b_min + (b_max - b_min) * (1.0 - u),
    "cosine": lambda u, b_max, b_min: b_min + (b_max - b_min) * (1.0 + math.cos(math.pi * u)) / 2.0,
    # The annealing temperature: a constant ratio per step.
    "exponential": lambda u, b_max, b_min: b_max * (b_min / b_max) ** u,
    # The no-annealing ablation.
    "constant": lambda u, b_max, b_min: b_max,
}


def annealing_budget(step: int, total_steps: int, heat_steps: int, cool_steps: int,
                     b_max: int, b_min: int, schedule: str) -> int:
    """Budget at annealing step ``step`` (0-based) of ``total_steps``.

    Parameters
    ----------
    step : int
        Annealing step s, ``0 <= s < total_steps``.
    total_steps : int
        R, the number of annealing rounds.
    heat_steps, cool_steps : int
        H and C; ``H + C <= R``.
    b_max, b_min : int
        Top and bottom budget, ``1 <= b_min <= b_max``.
    schedule : str
        A key of ``SHRINK_CURVES``.

    Returns
    -------
    int
        The budget, rounded to the nearest integer and clamped to ``[b_min, b_max]``.
    """
    if schedule not in SHRINK_CURVES:
        raise ValueError(f"schedule = {schedule!r} is not allowed; choose one of: {', '.join(SHRINK_CURVES)}")
    if not 0 <= step < total_steps:
        raise ValueError(f"annealing step {step} is outside 0..{total_steps - 1}")
    if heat_steps < 0 or cool_steps < 0 or heat_steps + cool_steps > total_steps:
        raise ValueError(f"heat ({heat_steps}) + cool ({cool_steps}) steps must fit in {total_steps} steps")
    if not 1 <= b_min <= b_max:
        raise ValueError(f"need 1 <= b_min ({b_min}) <= b_max ({b_max})")
    if schedule == "constant" or step < heat_steps:
        return b_max
    if step >= total_steps - cool_steps:
        return b_min
    u = (step - heat_steps) / (total_steps - heat_steps - cool_steps)
    value = SHRINK_CURVES[schedule](u, b_max, b_min)
    return int(min(b_max, max(b_min, round(value))))


def round_budget(server_round: int, num_rounds: int, init_rounds: int, heat_rounds: int,
                 cool_rounds: int, b_max: int, b_min: int, schedule: str) -> int:
    """Budget for a 1-based server round: ``b_max`` while initiating, then the annealing curve."""
    if not 1 <= server_round <= num_rounds:
        raise ValueError(f"server round {server_round} is outside 1..{num_rounds}")
    if server_round <= init_rounds:
        return b_max
    return annealing_budget(server_round - init_rounds - 1, num_rounds - init_rounds,
                            heat_rounds, cool_rounds, b_max, b_min, schedule)


LR_DECAYS = ("constant", "cosine")


def round_lr_factor(server_round: int, num_rounds: int, decay: str, final_ratio: float) -> float:
    """Multiplier of the clients' learning rate in ``server_round`` (1-based) of ``num_rounds``.

    ``constant``: 1 every round. ``cosine``: from 1 in round 1 down to ``final_ratio`` in the last round,
    along half a cosine, so that late rounds take small steps around the optimum instead of hopping
    across it (each round starts a fresh optimizer, so nothing else shrinks the steps between rounds).

    Examples
    --------
    >>> [round(round_lr_factor(r, 5, "cosine", 0.1), 3) for r in range(1, 6)]
    [1.0, 0.868, 0.55, 0.232, 0.1]
    """
    if decay == "constant" or num_rounds <= 1:
        return 1.0
    u = (server_round - 1) / (num_rounds - 1)
    return final_ratio + (1.0 - final_ratio) * (1.0 + math.cos(math.pi * u)) / 2.0
