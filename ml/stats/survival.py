"""Discrimination for censored time-to-event outcomes (scikit-survival).

- Harrell's C-index, :func:`sksurv.metrics.concordance_index_censored`: a pair is
  comparable when the earlier time is an event (or both times are equal and
  only the other is censored); concordant when the earlier event has the
  higher risk; tied risks count one half.
- Cumulative/dynamic time-dependent AUC at horizons ``t``,
  :func:`sksurv.metrics.cumulative_dynamic_auc` (Uno et al. 2007; Hung & Chiang
  2010): cases are events with ``time <= t``, controls are subjects with
  ``time > t``; cases are weighted by the inverse probability of remaining
  uncensored (Kaplan-Meier of the censoring times of the training set, which
  defaults to the evaluation set itself).

Risk scores: higher means earlier events (e.g. the model's 3-year metastasis
probability). Times are in any one unit (months in oncopacs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sksurv.metrics import (  # type: ignore[import-untyped]
    concordance_index_censored,
    cumulative_dynamic_auc,
)
from sksurv.util import Surv  # type: ignore[import-untyped]

from ml.stats.inputs import FloatArray, StatsError, binary_outcome, finite_scores


@dataclass(frozen=True)
class ConcordanceIndex:
    """Harrell's C with its pair counts."""

    c_index: float
    concordant: int
    discordant: int
    tied_risk: int
    tied_time: int


@dataclass(frozen=True)
class TimeDependentAuc:
    """Cumulative/dynamic AUC at each horizon, and its mean weighted by event density."""

    horizons: FloatArray
    auc: FloatArray
    mean_auc: float


def _survival(time: npt.ArrayLike, event: npt.ArrayLike, name: str,
              ) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Check follow-up times (finite, >= 0) and 0/1 event indicators."""
    ev = binary_outcome(event, f"{name} event", both_classes=False).astype(bool)
    t = finite_scores(time, ev.size, f"{name} time")
    if np.any(t < 0.0):
        raise StatsError(f"{name} time has {int(np.sum(t < 0.0))} negative values")
    if not ev.any():
        raise StatsError(f"{name} has no events among {ev.size} subjects")
    return t, ev


def harrell_c(time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike) -> ConcordanceIndex:
    """Return Harrell's concordance index of ``risk`` for censored times.

    Parameters
    ----------
    time : array_like
        Follow-up time of each subject (event or censoring).
    event : array_like
        1 if the event was observed at ``time``, 0 if censored.
    risk : array_like
        Risk score; higher means an earlier event is expected.

    Returns
    -------
    ConcordanceIndex

    Raises
    ------
    StatsError
        If the arrays differ in length, hold non-finite or negative times,
        there is no event, or no pair is comparable.
    """
    t, ev = _survival(time, event, "survival")
    r = finite_scores(risk, ev.size, "risk")
    try:
        c, conc, disc, tied_r, tied_t = concordance_index_censored(ev, t, r)
    except ValueError as exc:
        raise StatsError(f"C-index: {exc}") from exc
    return ConcordanceIndex(float(c), int(conc), int(disc), int(tied_r), int(tied_t))


def time_dependent_auc(time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike,
                       horizons: npt.ArrayLike, train_time: npt.ArrayLike | None = None,
                       train_event: npt.ArrayLike | None = None) -> TimeDependentAuc:
    """Return the cumulative/dynamic AUC of ``risk`` at each horizon.

    Parameters
    ----------
    time, event : array_like
        Follow-up times and event indicators of the evaluation set.
    risk : array_like
        Risk score of each evaluation subject (higher = earlier event).
    horizons : array_like
        Time points, each within ``[min(time), max(time))``.
    train_time, train_event : array_like, optional
        Training data for the censoring Kaplan-Meier; both or neither. Its
        follow-up must cover the evaluation times.

    Returns
    -------
    TimeDependentAuc
        Horizons sorted and deduplicated.

    Raises
    ------
    StatsError
        If the inputs are invalid, only one of the training arrays is given, or
        a horizon lies outside the evaluation follow-up.
    """
    t, ev = _survival(time, event, "evaluation")
    r = finite_scores(risk, ev.size, "risk")
    h = np.unique(np.atleast_1d(np.asarray(horizons, dtype=np.float64)))
    if h.size == 0 or not np.all(np.isfinite(h)) or h[0] < t.min() or h[-1] >= t.max():
        raise StatsError(f"horizons {h.tolist()} must be finite and within the evaluation "
                         f"follow-up [{t.min()}, {t.max()})")
    first_event = float(t[ev].min())
    if h[0] < first_event:
        raise StatsError(f"horizon {h[0]} precedes the first event at {first_event}: "
                         "no cases to compute an AUC")
    if (train_time is None) != (train_event is None):
        raise StatsError("give both train_time and train_event, or neither")
    if train_time is None or train_event is None:
        train = Surv.from_arrays(ev, t)
    else:
        train = Surv.from_arrays(*_survival(train_time, train_event, "training")[::-1])
    try:
        auc, mean_auc = cumulative_dynamic_auc(train, Surv.from_arrays(ev, t), r, h)
    except ValueError as exc:
        raise StatsError(f"time-dependent AUC: {exc}") from exc
    return TimeDependentAuc(h, np.asarray(auc, dtype=np.float64), float(mean_auc))
