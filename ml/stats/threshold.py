"""Sensitivity, specificity, PPV and NPV at a pre-fixed threshold, with binomial CIs.

A case is called positive when ``score >= threshold`` (the convention of
:func:`sklearn.metrics.roc_curve`). Confidence intervals come from
:meth:`scipy.stats.binomtest(...).proportion_ci` (Wilson score or
Clopper-Pearson "exact"). Thresholds are chosen on training data only, with
:func:`threshold_from_training`, and then applied unchanged to the test set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import binomtest
from sklearn.metrics import roc_curve

from ml.stats.inputs import StatsError, binary_outcome, finite_scores

CiMethod = Literal["wilson", "exact"]

_RULE = re.compile(r"^(sensitivity|specificity)\s*>=\s*([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class Proportion:
    """``count / total`` with a two-sided CI; all NaN when ``total`` is 0."""

    count: int
    total: int
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class ThresholdMetrics:
    """The 2x2 table at ``threshold`` and the four proportions derived from it."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion
    ci_method: CiMethod
    alpha: float


def proportion(count: int, total: int, alpha: float = 0.05,
               method: CiMethod = "wilson") -> Proportion:
    """Return ``count / total`` with its ``1 - alpha`` binomial confidence interval.

    Parameters
    ----------
    count, total : int
        Successes and trials, ``0 <= count <= total``.
    alpha : float
        One minus the confidence level.
    method : {"wilson", "exact"}
        Wilson score interval or Clopper-Pearson exact interval.

    Returns
    -------
    Proportion
        NaN estimate and bounds when ``total`` is 0 (e.g. PPV with no positive calls).

    Raises
    ------
    StatsError
        If the counts are inconsistent, ``alpha`` is not in (0, 1) or the method
        is unknown.
    """
    if not 0 <= count <= total:
        raise StatsError(f"proportion needs 0 <= count <= total, got {count} / {total}")
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha must be in (0, 1), got {alpha}")
    if method not in ("wilson", "exact"):
        raise StatsError(f"unknown CI method {method!r}; use 'wilson' or 'exact'")
    if total == 0:
        return Proportion(0, 0, math.nan, math.nan, math.nan)
    ci = binomtest(count, total).proportion_ci(confidence_level=1.0 - alpha, method=method)
    return Proportion(count, total, count / total, float(ci.low), float(ci.high))


def threshold_metrics(y: npt.ArrayLike, score: npt.ArrayLike, threshold: float,
                      alpha: float = 0.05, method: CiMethod = "wilson") -> ThresholdMetrics:
    """Return sensitivity, specificity, PPV and NPV of ``score >= threshold``.

    Parameters
    ----------
    y : array_like
        0/1 outcomes (one class alone is accepted; its missing proportions are NaN).
    score : array_like
        Scores, one per case.
    threshold : float
        The pre-fixed decision threshold.
    alpha : float
        One minus the confidence level.
    method : {"wilson", "exact"}
        Binomial CI method.

    Returns
    -------
    ThresholdMetrics

    Raises
    ------
    StatsError
        If the outcomes or scores are invalid, the threshold is NaN, or the CI
        arguments are invalid.
    """
    outcome = binary_outcome(y, both_classes=False)
    values = finite_scores(score, outcome.size)
    if math.isnan(threshold):
        raise StatsError("threshold is NaN")
    called = values >= threshold
    event = outcome == 1
    tp = int(np.sum(called & event))
    fp = int(np.sum(called & ~event))
    tn = int(np.sum(~called & ~event))
    fn = int(np.sum(~called & event))
    return ThresholdMetrics(
        threshold=float(threshold), tp=tp, fp=fp, tn=tn, fn=fn,
        sensitivity=proportion(tp, tp + fn, alpha, method),
        specificity=proportion(tn, tn + fp, alpha, method),
        ppv=proportion(tp, tp + fp, alpha, method),
        npv=proportion(tn, tn + fn, alpha, method),
        ci_method=method, alpha=alpha)


def threshold_from_training(y: npt.ArrayLike, score: npt.ArrayLike,
                            rule: str = "youden") -> float:
    """Choose a decision threshold on training data.

    Parameters
    ----------
    y : array_like
        0/1 training outcomes (both classes present).
    score : array_like
        Training scores.
    rule : str
        ``"youden"``: maximise sensitivity + specificity - 1 (the highest such
        threshold on ties). ``"sensitivity>=x"``: the highest threshold whose
        sensitivity is at least ``x`` (so the best specificity under that
        constraint). ``"specificity>=x"``: the lowest threshold whose
        specificity is at least ``x``.

    Returns
    -------
    float
        One of the training scores; apply as ``score >= threshold``.

    Raises
    ------
    StatsError
        If the inputs are invalid, the rule cannot be parsed, ``x`` is not in
        [0, 1], or no training score meets the constraint.
    """
    outcome = binary_outcome(y)
    values = finite_scores(score, outcome.size)
    fpr, tpr, thresholds = roc_curve(outcome, values, drop_intermediate=False)
    # Index 0 is sklearn's +inf threshold (nobody called positive); skip it.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    match = _RULE.match(rule.strip())
    if match is None:
        raise StatsError(f"unknown threshold rule {rule!r}; use 'youden', "
                         "'sensitivity>=x' or 'specificity>=x'")
    target = float(match.group(2))
    if not 0.0 <= target <= 1.0:
        raise StatsError(f"threshold rule {rule!r}: {target} is not in [0, 1]")
    if match.group(1) == "sensitivity":
        ok = np.flatnonzero(tpr >= target)
        return float(thresholds[ok[0]])
    ok = np.flatnonzero(1.0 - fpr >= target)
    if ok.size == 0:
        raise StatsError(f"threshold rule {rule!r}: no training score reaches specificity "
                         f"{target} (best {1.0 - fpr[0]:.3f})")
    return float(thresholds[ok[-1]])
