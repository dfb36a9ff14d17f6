"""Numbers that are not bools."""

import math

import numpy as np
import pytest

from safedlora_app.core.checks import is_integer, is_number


@pytest.mark.parametrize("value, number, integer", [
    (1, True, True),
    (0, True, True),
    (-3, True, True),
    (1.0, True, False),
    (math.nan, True, False),
    (math.inf, True, False),
    (np.int64(2), True, True),
    (np.int32(2), True, True),
    (np.float32(0.5), True, False),
    (np.float64(0.5), True, False),
    (True, False, False),
    (False, False, False),
    (np.bool_(True), False, False),
    ("1", False, False),
    (None, False, False),
    (1j, False, False),
    ([1], False, False),
])
def test_numbers_and_integers_are_not_bools_or_text(value, number, integer):
    assert is_number(value) is number
    assert is_integer(value) is integer
