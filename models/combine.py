"""The final score: offline XGBoost, plus evidence from the online model ("noisy-or").

    final = 1 - (1 - xgb) * (1 - weight * online)

XGBoost alone is the baseline: it was trained and validated offline on a large history, and its
threshold was chosen on that validation. The online River model learns from recent labels and can
catch patterns XGBoost never saw, but it is noisier, so it may only ADD evidence: `final >= xgb`
always, scaled by `weight` in [0, 1]. With `weight == 0`, or while the online model is warming up
(it then reports 0.0), the final score is bit-for-bit the XGBoost score, so the offline model's
metrics and threshold still hold exactly.

The formula is evaluated as `xgb + (1 - xgb) * (weight * online)`, the same value algebraically,
because the textbook form `1 - (1 - xgb) * 1` is not exactly `xgb` in floating point (for
xgb = 1e-20 it gives 0.0). This form is exact when the online term is 0, never below `xgb`, and
exactly monotone in `online`; in `xgb` it is monotone up to one rounding (~1e-16).
"""

from __future__ import annotations

from typing import overload

import numpy as np
import numpy.typing as npt


@overload
def combine(xgb: float, online: float, weight: float) -> float: ...


@overload
def combine(xgb: npt.ArrayLike, online: npt.ArrayLike, weight: float) -> npt.NDArray[np.float64]: ...


def combine(
    xgb: float | npt.ArrayLike, online: float | npt.ArrayLike, weight: float
) -> float | npt.NDArray[np.float64]:
    """Noisy-or of the XGBoost and weighted online probabilities; see the module docstring.

    Broadcasts like numpy (arrays of equal shape, or an array with a scalar). Returns a Python
    float when both scores are scalars, otherwise a float64 array. Inputs are assumed to be
    probabilities in [0, 1] (not re-checked per transaction: this is the hot path); `weight`
    outside [0, 1] is a configuration error and raises `ValueError`.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if type(xgb) is float and type(online) is float:
        # Two Python floats (the scorer's case, per transaction): the same float64 operations in
        # the same order as below, without building numpy scalars.
        return xgb + (1.0 - xgb) * (float(weight) * online)
    x = np.asarray(xgb, dtype=np.float64)
    evidence = weight * np.asarray(online, dtype=np.float64)
    final = x + (1.0 - x) * evidence
    if final.ndim == 0:
        return float(final)
    return final
