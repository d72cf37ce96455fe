"""Calibration of predicted probabilities: intercept, slope, Brier score, reliability curve.

- Calibration-in-the-large (intercept): the ``a`` of ``logit P(y=1) = a + lp`` with
  the model's linear predictor ``lp = logit(prob)`` as an offset (slope fixed at 1);
  0 when the mean prediction matches the event rate. Its maximum-likelihood
  equation ``sum(y - expit(a + lp)) = 0`` is monotone in ``a`` and solved with
  :func:`scipy.optimize.brentq`.
- Calibration slope: the ``b`` of ``logit P(y=1) = c + b * lp`` (logistic
  recalibration), fitted without penalty by
  :class:`sklearn.linear_model.LogisticRegression`; 1 is ideal, below 1 means
  predictions are too extreme (overfitting).
- Wald CIs from the observed Fisher information of each fit.
- Brier score by :func:`sklearn.metrics.brier_score_loss`; the scaled Brier is
  ``1 - brier / (prevalence * (1 - prevalence))``.
- Reliability curve binned exactly as :func:`sklearn.calibration.calibration_curve`
  (quantile or uniform bins), plus per-bin counts and Wilson CIs of the observed
  event rate, which that function does not return.

Probabilities are clipped to [1e-10, 1 - 1e-10] before the logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from ml.stats.inputs import FloatArray, IntArray, StatsError, binary_outcome, probabilities
from ml.stats.threshold import proportion

BinStrategy = Literal["quantile", "uniform"]

_EPS = 1e-10


@dataclass(frozen=True)
class Calibration:
    """Calibration summary of one model's probabilities on one data set."""

    n: int
    prevalence: float
    mean_predicted: float
    intercept: float
    intercept_low: float
    intercept_high: float
    slope: float
    slope_low: float
    slope_high: float
    brier: float
    brier_scaled: float
    bin_predicted: FloatArray
    """Mean predicted probability of each non-empty bin."""
    bin_observed: FloatArray
    """Observed event rate of each non-empty bin."""
    bin_count: IntArray
    bin_observed_low: FloatArray
    bin_observed_high: FloatArray
    alpha: float


def _intercept(y: npt.NDArray[np.int64], lp: FloatArray) -> tuple[float, float]:
    """Calibration-in-the-large and its standard error."""
    a = float(brentq(lambda a: float(np.sum(y - expit(a + lp))), -100.0, 100.0, xtol=1e-12))
    p = expit(a + lp)
    return a, float(1.0 / np.sqrt(np.sum(p * (1.0 - p))))


def _slope(y: npt.NDArray[np.int64], lp: FloatArray) -> tuple[float, float]:
    """Calibration slope and its standard error."""
    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(lp[:, None], y)
    p = expit(fit.intercept_[0] + fit.coef_[0, 0] * lp)
    design = np.column_stack([np.ones_like(lp), lp])
    cov = np.linalg.inv(design.T @ (design * (p * (1.0 - p))[:, None]))
    return float(fit.coef_[0, 0]), float(np.sqrt(cov[1, 1]))


def _bins(y: npt.NDArray[np.int64], prob: FloatArray, n_bins: int,
          strategy: BinStrategy) -> tuple[FloatArray, IntArray, IntArray]:
    """Per-bin mean prediction, event count and case count (non-empty bins)."""
    if strategy == "quantile":
        edges = np.percentile(prob, np.linspace(0.0, 100.0, n_bins + 1))
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        raise StatsError(f"unknown bin strategy {strategy!r}; use 'quantile' or 'uniform'")
    ids = np.searchsorted(edges[1:-1], prob)
    total = np.bincount(ids, minlength=n_bins)
    keep = total > 0
    pred = np.bincount(ids, weights=prob, minlength=n_bins)[keep] / total[keep]
    events = np.bincount(ids[y == 1], minlength=n_bins)[keep]
    return pred, events.astype(np.int64), total[keep].astype(np.int64)


def calibration(y: npt.ArrayLike, prob: npt.ArrayLike, n_bins: int = 10,
                strategy: BinStrategy = "quantile", alpha: float = 0.05) -> Calibration:
    """Return calibration intercept, slope, Brier score and reliability curve.

    Parameters
    ----------
    y : array_like
        0/1 outcomes (both classes present).
    prob : array_like
        Predicted probabilities of the event.
    n_bins : int
        Number of reliability bins.
    strategy : {"quantile", "uniform"}
        Equal-count bins or equal-width bins on [0, 1].
    alpha : float
        One minus the confidence level of the Wald and Wilson intervals.

    Returns
    -------
    Calibration

    Raises
    ------
    StatsError
        If the outcomes or probabilities are invalid, ``n_bins`` < 1, ``alpha``
        is not in (0, 1), the strategy is unknown, or all probabilities are equal
        (slope not identifiable).
    """
    outcome = binary_outcome(y)
    p = probabilities(prob, outcome.size)
    if n_bins < 1:
        raise StatsError(f"n_bins must be at least 1, got {n_bins}")
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha must be in (0, 1), got {alpha}")
    lp = logit(np.clip(p, _EPS, 1.0 - _EPS))
    if np.ptp(lp) == 0.0:
        raise StatsError(f"all {lp.size} probabilities are equal ({p[0]}): the calibration "
                         "slope is not identifiable")
    z = float(norm.ppf(1.0 - alpha / 2.0))
    a, a_se = _intercept(outcome, lp)
    b, b_se = _slope(outcome, lp)
    brier = float(brier_score_loss(outcome, p))
    prevalence = float(outcome.mean())
    pred, events, count = _bins(outcome, p, n_bins, strategy)
    cis = [proportion(int(e), int(c), alpha) for e, c in zip(events, count, strict=True)]
    return Calibration(
        n=int(outcome.size), prevalence=prevalence, mean_predicted=float(p.mean()),
        intercept=a, intercept_low=a - z * a_se, intercept_high=a + z * a_se,
        slope=b, slope_low=b - z * b_se, slope_high=b + z * b_se,
        brier=brier, brier_scaled=1.0 - brier / (prevalence * (1.0 - prevalence)),
        bin_predicted=pred, bin_observed=events / count, bin_count=count,
        bin_observed_low=np.array([c.low for c in cis]),
        bin_observed_high=np.array([c.high for c in cis]),
        alpha=alpha)
