"""Comparing feature values and scores the way the tests mean "the same": NaN equals NaN."""

from __future__ import annotations

import math
from collections.abc import Sequence


def same(a: float | Sequence[float], b: float | Sequence[float], tol: float = 0.0) -> bool:
    """`a` and `b` (two numbers, or two sequences of equal length) equal, NaN == NaN; with `tol`, equal
    within it (relative and absolute)."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return (
            (math.isnan(a) and math.isnan(b))
            or a == b
            or (tol > 0 and math.isclose(a, b, rel_tol=tol, abs_tol=tol))
        )
    assert not isinstance(a, int | float) and not isinstance(b, int | float)
    return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
