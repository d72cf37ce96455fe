"""ROC AUC with confidence intervals, and the DeLong test of two correlated AUCs.

scikit-learn has no AUC variance, so the DeLong et al. (1988) covariance of the
Mann-Whitney AUC estimates is computed here with the O(n log n) midrank
algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11):1389-1393):
with ``m`` events and ``n`` non-events, midranks of the events among
themselves (``tx``), of the non-events among themselves (``ty``) and of all
cases pooled (``tz``) give the structural components

    V10_i = (tz_i - tx_i) / n        (events)
    V01_j = 1 - (tz_j - ty_j) / m    (non-events)

whose sample covariances give ``S = S10 / m + S01 / n``. Ties count one half, as
in pROC and :func:`sklearn.metrics.roc_auc_score`. A higher score means the
event is more likely; there is no automatic direction flip.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import norm, rankdata

from ml.stats.inputs import FloatArray, StatsError, binary_outcome, finite_scores

log = logging.getLogger(__name__)

AucMethod = Literal["delong", "bootstrap"]

_BOOT_CELLS = 4_000_000
"""Upper bound on resample-matrix cells held in memory at once by the bootstrap."""


@dataclass(frozen=True)
class AucCI:
    """An AUC with its two-sided ``1 - alpha`` confidence interval."""

    auc: float
    low: float
    high: float
    se: float
    method: AucMethod
    alpha: float


@dataclass(frozen=True)
class DelongResult:
    """DeLong test of ``auc_a - auc_b`` on the same cases (two-sided)."""

    auc_a: float
    auc_b: float
    diff: float
    z: float
    p_value: float
    cov: FloatArray
    """2x2 DeLong covariance matrix of (auc_a, auc_b)."""
    diff_low: float
    diff_high: float
    alpha: float


def _split(y: npt.ArrayLike, scores: Sequence[npt.ArrayLike],
           ) -> tuple[FloatArray, FloatArray]:
    """Stack scores and split them into event and non-event columns."""
    outcome = binary_outcome(y)
    n_events = int(outcome.sum())
    if n_events < 2 or outcome.size - n_events < 2:
        raise StatsError(f"AUC variance needs at least 2 events and 2 non-events, got "
                         f"{n_events} and {outcome.size - n_events}")
    stacked = np.vstack([finite_scores(s, outcome.size, f"score {k}")
                         for k, s in enumerate(scores)])
    return stacked[:, outcome == 1], stacked[:, outcome == 0]


def delong_covariance(y: npt.ArrayLike, scores: Sequence[npt.ArrayLike],
                      ) -> tuple[FloatArray, FloatArray]:
    """Return the AUCs of several scores on the same cases and their DeLong covariance.

    Parameters
    ----------
    y : array_like
        0/1 outcomes, shape ``(N,)``.
    scores : sequence of array_like
        ``k`` score vectors, each of shape ``(N,)``.

    Returns
    -------
    aucs : numpy.ndarray
        Shape ``(k,)``.
    cov : numpy.ndarray
        Shape ``(k, k)``; the diagonal holds the DeLong variances.

    Raises
    ------
    StatsError
        If the outcomes are not 0/1 with at least 2 of each class, or a score
        vector has the wrong length or non-finite values.
    """
    pos, neg = _split(y, scores)
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.hstack([pos, neg]), axis=1)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs.astype(np.float64), cov.astype(np.float64)


def _bootstrap_aucs(pos: FloatArray, neg: FloatArray, n_boot: int, seed: int) -> FloatArray:
    """AUCs of ``n_boot`` resamples drawn with replacement within each class."""
    m, n = pos.size, neg.size
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _BOOT_CELLS // (m + n))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        sample = np.hstack([pos[rng.integers(0, m, size=(b, m))],
                            neg[rng.integers(0, n, size=(b, n))]])
        ranks = rankdata(sample, axis=1)
        out[start:start + b] = (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    return out


def auc_ci(y: npt.ArrayLike, score: npt.ArrayLike, method: AucMethod = "delong",
           alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> AucCI:
    """Return the ROC AUC of ``score`` with a two-sided ``1 - alpha`` CI.

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    score : array_like
        Scores, higher meaning the event is more likely.
    method : {"delong", "bootstrap"}
        ``"delong"``: AUC +/- z * DeLong SE, clipped to [0, 1] (as pROC's
        ``ci.auc``). ``"bootstrap"``: percentile interval of ``n_boot`` stratified
        resamples (cases and controls resampled separately), seeded by ``seed``;
        ``se`` is the standard deviation of the resampled AUCs.
    alpha : float
        One minus the confidence level.
    n_boot : int
        Number of bootstrap resamples.
    seed : int
        Seed of the bootstrap generator (:func:`numpy.random.default_rng`).

    Returns
    -------
    AucCI
        With perfect separation or constant scores the DeLong variance is zero
        and the interval collapses onto the AUC (a warning is logged).

    Raises
    ------
    StatsError
        If the inputs are invalid (see :func:`delong_covariance`), ``alpha`` is
        not in (0, 1), ``n_boot`` < 2 or ``method`` is unknown.
    """
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha must be in (0, 1), got {alpha}")
    if method == "delong":
        aucs, cov = delong_covariance(y, [score])
        auc, se = float(aucs[0]), float(np.sqrt(max(cov[0, 0], 0.0)))
        if se == 0.0:
            log.warning("DeLong variance is zero (AUC %.3f: perfect separation or no "
                        "discrimination); the confidence interval is degenerate", auc)
        half = float(norm.ppf(1.0 - alpha / 2.0)) * se
        return AucCI(auc, max(0.0, auc - half), min(1.0, auc + half), se, method, alpha)
    if method == "bootstrap":
        if n_boot < 2:
            raise StatsError(f"n_boot must be at least 2, got {n_boot}")
        pos, neg = _split(y, [score])
        m, n = pos.shape[1], neg.shape[1]
        ranks = rankdata(np.hstack([pos[0], neg[0]]))
        auc = float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        boot = _bootstrap_aucs(pos[0], neg[0], n_boot, seed)
        low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
        return AucCI(auc, float(low), float(high), float(boot.std(ddof=1)), method, alpha)
    raise StatsError(f"unknown AUC CI method {method!r}; use 'delong' or 'bootstrap'")


def delong_test(y: npt.ArrayLike, score_a: npt.ArrayLike, score_b: npt.ArrayLike,
                alpha: float = 0.05) -> DelongResult:
    """Compare two correlated AUCs measured on the same cases (DeLong 1988).

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    score_a, score_b : array_like
        The two scores (e.g. the model's probability and TNM stage).
    alpha : float
        One minus the confidence level of the CI of ``auc_a - auc_b``.

    Returns
    -------
    DelongResult
        ``z = (auc_a - auc_b) / sqrt(var_a + var_b - 2 cov_ab)`` and the
        two-sided normal p-value. When the variance of the difference is zero,
        ``z`` is 0 with p = 1 if the AUCs are equal (identical scores, as pROC),
        else +/-inf with p = 0.

    Raises
    ------
    StatsError
        If the inputs are invalid (see :func:`delong_covariance`) or ``alpha``
        is not in (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha must be in (0, 1), got {alpha}")
    aucs, cov = delong_covariance(y, [score_a, score_b])
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(var)) if var > 0.0 else 0.0
    if se > 0.0:
        z = diff / se
        p_value = float(2.0 * norm.sf(abs(z)))
    elif diff == 0.0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = float(np.copysign(np.inf, diff)), 0.0
    half = float(norm.ppf(1.0 - alpha / 2.0)) * se
    return DelongResult(float(aucs[0]), float(aucs[1]), diff, z, p_value, cov,
                        diff - half, diff + half, alpha)
