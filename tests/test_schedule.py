"""Budget schedule values at every phase boundary, for each schedule."""

import math

import pytest

from safedlora_app.core.schedule import annealing_budget, round_budget

B_MAX, B_MIN = 96, 24


@pytest.mark.parametrize("schedule", ["cubic", "linear", "cosine", "exponential"])
def test_phase_boundaries(schedule):
    R, H, C = 10, 2, 3  # shrink steps s = 2..6, u = (s-2)/5
    budgets = [annealing_budget(s, R, H, C, B_MAX, B_MIN, schedule) for s in range(R)]
    assert budgets[:H] == [B_MAX, B_MAX]          # heating
    assert budgets[H] == B_MAX                    # u = 0 starts at the top
    assert budgets[R - C:] == [B_MIN] * C         # cooling
    assert all(x >= y for x, y in zip(budgets, budgets[1:]))
    assert all(B_MIN <= b <= B_MAX for b in budgets)


def test_curve_values_by_hand():
    # s = 4 -> u = 2/5
    def at(schedule):
        return annealing_budget(4, 10, 2, 3, B_MAX, B_MIN, schedule)
    assert at("cubic") == round(24 + 72 * 0.6 ** 3)                          # 39.552 -> 40
    assert at("linear") == round(24 + 72 * 0.6)                              # 67.2 -> 67
    assert at("cosine") == round(24 + 72 * (1 + math.cos(math.pi * 0.4)) / 2)  # 59.1 -> 59
    assert at("exponential") == round(96 * 0.25 ** 0.4)                      # 55.1 -> 55
    assert at("constant") == B_MAX


def test_constant_never_shrinks():
    assert {annealing_budget(s, 6, 1, 2, B_MAX, B_MIN, "constant") for s in range(6)} == {B_MAX}


def test_no_shrink_phase_jumps_from_heat_to_cool():
    assert [annealing_budget(s, 4, 2, 2, 8, 2, "cubic") for s in range(4)] == [8, 8, 2, 2]


def test_round_budget_initiating_rounds_use_b_max():
    budgets = [round_budget(t, 8, 2, 1, 1, 48, 12, "linear") for t in range(1, 9)]
    # annealing R = 6, H = 1, C = 1: s = 1..4 shrink with u = 0, .25, .5, .75
    assert budgets == [48, 48, 48, 48, 39, 30, 21, 12]


def test_invalid_inputs():
    with pytest.raises(ValueError, match="schedule"):
        annealing_budget(0, 4, 0, 0, 8, 2, "quadratic")
    with pytest.raises(ValueError, match="outside"):
        annealing_budget(4, 4, 0, 0, 8, 2, "cubic")
    with pytest.raises(ValueError, match="b_min"):
        annealing_budget(0, 4, 0, 0, 2, 8, "cubic")


def test_round_lr_factor_cosine_runs_from_one_to_the_final_ratio():
    from safedlora_app.core.schedule import round_lr_factor

    factors = [round_lr_factor(r, 12, "cosine", 0.1) for r in range(1, 13)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert factors[5] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 5 / 11)) / 2)
    assert {round_lr_factor(r, 12, "constant", 0.1) for r in range(1, 13)} == {1.0}
    assert round_lr_factor(1, 1, "cosine", 0.1) == 1.0


def test_rounds_after_the_planned_ones_keep_the_plans_last_rate_and_budget():
    """Issue #36: a run of 12 rounds extended to 24 re-planned both for 24 rounds, so round 13 got budget 30 and
    52% of lr after round 12's 24 and 10%. With schedule-rounds = 12 (what an extension keeps), rounds 13-24 go
    on at round 12's values, and the first 12 rounds are the plain 12-round run's."""
    from safedlora_app.core.config import RunConfig
    from safedlora_app.core.round_plan import budget, lr_factor

    plain = RunConfig(num_server_rounds=12, rank_min=2).effective
    extended = RunConfig(num_server_rounds=24, schedule_rounds=12, rank_min=2).effective
    replanned = RunConfig(num_server_rounds=24, rank_min=2).effective
    assert [budget(extended, t, 12) for t in range(1, 13)] == [budget(plain, t, 12) for t in range(1, 13)]
    assert [lr_factor(extended, t) for t in range(1, 13)] == [lr_factor(plain, t) for t in range(1, 13)]
    assert {budget(extended, t, 12) for t in range(12, 25)} == {24}
    assert [lr_factor(extended, t) for t in range(12, 25)] == pytest.approx([0.1] * 13)
    assert (budget(replanned, 13, 12), round(lr_factor(replanned, 13), 2)) == (30, 0.52)
