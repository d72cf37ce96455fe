"""Decision-curve analysis (Vickers & Elkin, Med Decis Making 2006;26:565-574).

At a threshold probability ``pt`` a patient is treated when ``prob >= pt``, and

    net benefit = TP / n - FP / n * pt / (1 - pt)

treat-all is ``prevalence - (1 - prevalence) * pt / (1 - pt)`` and treat-none is 0.
The formula is computed here directly rather than through the ``dcurves``
package: it is three lines, and ``dcurves`` would add statsmodels and lifelines
and pin pandas below 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.stats.inputs import FloatArray, StatsError, binary_outcome, finite_scores, probabilities

DEFAULT_THRESHOLDS: FloatArray = np.round(np.arange(0.01, 1.0, 0.01), 2)
"""Threshold probabilities 0.01, 0.02, ..., 0.99."""


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of a model and of the two default strategies over a threshold grid."""

    thresholds: FloatArray
    model: FloatArray
    treat_all: FloatArray
    treat_none: FloatArray
    prevalence: float
    n: int


def net_benefit(y: npt.ArrayLike, prob: npt.ArrayLike, thresholds: npt.ArrayLike,
                ) -> FloatArray:
    """Return the net benefit of treating ``prob >= pt`` at each threshold ``pt``.

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    prob : array_like
        Predicted probabilities of the event.
    thresholds : array_like
        Threshold probabilities, each in (0, 1).

    Returns
    -------
    numpy.ndarray
        One net benefit per threshold.

    Raises
    ------
    StatsError
        If the outcomes or probabilities are invalid or a threshold is not in (0, 1).
    """
    outcome = binary_outcome(y, both_classes=False)
    p = probabilities(prob, outcome.size)
    pts = _thresholds(thresholds)
    treated = p[None, :] >= pts[:, None]
    tp = (treated & (outcome == 1)).sum(axis=1)
    fp = (treated & (outcome == 0)).sum(axis=1)
    n = outcome.size
    return np.asarray(tp / n - fp / n * pts / (1.0 - pts), dtype=np.float64)


def _thresholds(thresholds: npt.ArrayLike) -> FloatArray:
    """Check a 1-D grid of threshold probabilities strictly inside (0, 1)."""
    pts = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    pts = finite_scores(pts, pts.size, "thresholds")
    bad = np.flatnonzero((pts <= 0.0) | (pts >= 1.0))
    if bad.size:
        raise StatsError(f"threshold probability {pts[bad[0]]} (index {bad[0]}) is not in (0, 1)")
    return pts


def decision_curve(y: npt.ArrayLike, prob: npt.ArrayLike,
                   thresholds: npt.ArrayLike = DEFAULT_THRESHOLDS) -> DecisionCurve:
    """Return the decision curve of a model with its treat-all and treat-none references.

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    prob : array_like
        Predicted probabilities of the event.
    thresholds : array_like
        Threshold probabilities in (0, 1); default 0.01 to 0.99 by 0.01.

    Returns
    -------
    DecisionCurve

    Raises
    ------
    StatsError
        If the outcomes, probabilities or thresholds are invalid.
    """
    outcome = binary_outcome(y, both_classes=False)
    pts = _thresholds(thresholds)
    model = net_benefit(outcome, prob, pts)
    prevalence = float(outcome.mean())
    treat_all = prevalence - (1.0 - prevalence) * pts / (1.0 - pts)
    return DecisionCurve(pts, model, treat_all, np.zeros_like(pts), prevalence, int(outcome.size))
