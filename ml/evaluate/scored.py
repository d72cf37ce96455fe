"""The evaluation contract: one model's scores on a test set, with comparators.

A model helper's ``score_<model>(package, manifest, ...)`` returns a
:class:`Scored`; :func:`ml.evaluate.run.evaluate_scored` turns it into metrics,
figures and a report. The object validates itself on construction so every
later statistic can rely on aligned, finite, binary inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ml.errors import OncopacsError


class ScoredError(OncopacsError):
    """A :class:`Scored` object was built from inconsistent or invalid data."""


def _check_prob(name: str, values: np.ndarray, n: int) -> None:
    """Raise unless ``values`` is a 1-D array of ``n`` finite numbers in [0, 1]."""
    if values.ndim != 1 or values.shape[0] != n:
        raise ScoredError(f"{name} has shape {values.shape}, expected ({n},) to match y")
    if not np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_:
        raise ScoredError(f"{name} has dtype {values.dtype}, expected probabilities")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ScoredError(f"{name} has {bad.size} non-finite values (first at index {bad[0]})")
    bad = np.flatnonzero((values < 0.0) | (values > 1.0))
    if bad.size:
        raise ScoredError(f"{name} has {bad.size} values outside [0, 1] "
                          f"(first {values[bad[0]]!r} at index {bad[0]})")


def _check_y(y: np.ndarray) -> None:
    """Raise unless ``y`` is a 1-D 0/1 array holding both classes."""
    if y.ndim != 1 or y.size == 0:
        raise ScoredError(f"y must be a non-empty 1-D array, got shape {y.shape}")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number):
            raise ScoredError(f"y has dtype {y.dtype}, expected 0/1 outcomes")
        bad = np.flatnonzero((y != 0) & (y != 1))
        if bad.size:
            raise ScoredError(f"y has {bad.size} values other than 0/1 "
                              f"(first {y[bad[0]]!r} at index {bad[0]})")
    events = int(np.sum(y.astype(np.int64)))
    if events in (0, y.size):
        raise ScoredError(f"y has {events} events out of {y.size}: both classes are needed")


@dataclass(frozen=True)
class Scored:
    """One model's probabilities on a test set, with comparators and references.

    Attributes
    ----------
    model_name : str
        E.g. ``"crc-liver-metastasis 1.0.0"``.
    task : str
        ``"crc-liver-metastasis"`` or ``"pdac-tsr"``.
    outcome_name : str
        E.g. ``"liver metastasis within 3 years"``.
    patient_ids : list of str
        One per case (kept out of logs and the report).
    centres : list of str
        Centre of each case.
    y : numpy.ndarray
        0/1 outcome of each case, both classes present.
    prob : numpy.ndarray
        The model's probability of the outcome.
    threshold : float
        Decision threshold fixed on training data, in (0, 1).
    comparators : dict of str to numpy.ndarray
        Other models' probabilities on the same cases (e.g. ``"TNM stage only"``).
    tested : list of str
        Comparator names that get a DeLong test against the model.
    reference : dict of str to numpy.ndarray
        Non-model probabilities, e.g. ``"generator truth (best achievable)"``.
    time_months, event, risk_for_survival : numpy.ndarray or None
        Follow-up time, event indicator and risk score for the C-index; all three
        or none.
    split : dict
        Description of the data split (test centre, counts, seeds).
    notes : list of str
        Free-text lines for the report.

    Raises
    ------
    ScoredError
        On construction, if any field is inconsistent (lengths, non-binary ``y``,
        one class only, probabilities outside [0, 1] or not finite, threshold not
        in (0, 1), a ``tested`` name that is not a comparator, partial survival data).
    """

    model_name: str
    task: str
    outcome_name: str
    patient_ids: list[str]
    centres: list[str]
    y: np.ndarray
    prob: np.ndarray
    threshold: float
    comparators: dict[str, np.ndarray]
    tested: list[str]
    reference: dict[str, np.ndarray]
    time_months: np.ndarray | None
    event: np.ndarray | None
    risk_for_survival: np.ndarray | None
    split: dict[str, object]
    notes: list[str]

    def __post_init__(self) -> None:
        y = np.asarray(self.y)
        _check_y(y)
        n = y.size
        if len(self.patient_ids) != n:
            raise ScoredError(f"patient_ids has {len(self.patient_ids)} entries, y has {n}")
        if len(self.centres) != n:
            raise ScoredError(f"centres has {len(self.centres)} entries, y has {n}")
        _check_prob("prob", np.asarray(self.prob), n)
        try:
            threshold = float(self.threshold)
        except (TypeError, ValueError):
            threshold = math.nan
        if not 0.0 < threshold < 1.0:
            raise ScoredError(f"threshold must be in (0, 1), got {self.threshold!r}")
        for kind, table in (("comparator", self.comparators), ("reference", self.reference)):
            for name, values in table.items():
                _check_prob(f"{kind} {name!r}", np.asarray(values), n)
        unknown = [name for name in self.tested if name not in self.comparators]
        if unknown:
            raise ScoredError(f"tested names {unknown} are not comparators "
                              f"(have {sorted(self.comparators)})")
        self._check_survival(n)

    def _check_survival(self, n: int) -> None:
        """Survival fields: all three or none, each of length ``n`` and finite."""
        parts = {"time_months": self.time_months, "event": self.event,
                 "risk_for_survival": self.risk_for_survival}
        given = [name for name, value in parts.items() if value is not None]
        if not given:
            return
        if len(given) != len(parts):
            missing = sorted(set(parts) - set(given))
            raise ScoredError(f"survival data is partial: {given} given but {missing} missing")
        for name, value in parts.items():
            arr = np.asarray(value)
            if arr.shape != (n,):
                raise ScoredError(f"{name} has shape {arr.shape}, expected ({n},) to match y")
            if name != "event" and not np.all(np.isfinite(arr.astype(np.float64))):
                raise ScoredError(f"{name} has non-finite values")
        time = np.asarray(self.time_months, dtype=np.float64)
        if np.any(time < 0.0):
            raise ScoredError(f"time_months has {int(np.sum(time < 0.0))} negative values")
        event = np.asarray(self.event)
        if event.dtype != np.bool_ and np.any((event != 0) & (event != 1)):
            raise ScoredError("event must hold 0/1 or booleans")

    @property
    def n(self) -> int:
        """Number of cases."""
        return int(np.asarray(self.y).size)

    @property
    def has_survival(self) -> bool:
        """Whether follow-up time, event and a survival risk score are given."""
        return self.time_months is not None
