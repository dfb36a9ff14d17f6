"""Type checks for values read from records, replies and config files.

Python's ``bool`` is a subclass of ``int``, so ``isinstance(True, int)`` holds; a count, a rank or a
metric that arrives as ``true`` is a mistake, not the number 1. These checks say no to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number: an int or a float (NumPy's included), not a bool.

    Parameters
    ----------
    value : Any
        The value to check.

    Returns
    -------
    bool
        True for ``1``, ``1.0``, ``nan``, ``inf``, ``numpy.int64(1)``, ``numpy.float32(1)``; False for
        ``True``, ``numpy.bool_(True)``, ``"1"``, ``None``, complex numbers and containers.
    """
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer: an int (NumPy's included), not a bool, not a float.

    Parameters
    ----------
    value : Any
        The value to check.

    Returns
    -------
    bool
        True for ``1`` and ``numpy.int64(1)``; False for ``True``, ``1.0``, ``"1"`` and ``None``.
    """
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
