"""The figures of one evaluation, computed with :mod:`ml.stats` and kept JSON-ready.

Each function takes a validated :class:`~ml.evaluate.scored.Scored` and returns
plain dicts of floats, ints, strings and lists (NaN and infinities become
``None``), so the result can be written to ``metrics.json`` as it is. A figure
that the data cannot support (one class in a centre, a horizon past the
follow-up) is reported with ``"estimable": False`` and the reason, never
dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml.evaluate.scored import Scored
from ml.stats.auc import AucCI, auc_ci, delong_test
from ml.stats.calibration import calibration
from ml.stats.decision import decision_curve, net_benefit
from ml.stats.inputs import StatsError
from ml.stats.survival import harrell_c, time_dependent_auc
from ml.stats.threshold import Proportion, threshold_metrics

DCA_THRESHOLDS: np.ndarray = np.round(np.arange(0.05, 0.6 + 1e-9, 0.01), 2)
"""Decision-curve threshold probabilities 0.05, 0.06, ..., 0.60."""

HORIZONS_MONTHS: tuple[float, ...] = (12.0, 24.0, 36.0)
"""Horizons of the time-dependent AUC."""


@dataclass(frozen=True)
class AucSettings:
    """How AUC confidence intervals are computed: DeLong, or a seeded bootstrap."""

    bootstrap: int = 0
    seed: int = 0

    @property
    def method(self) -> str:
        """``"delong"`` when ``bootstrap`` is 0, else ``"bootstrap"``."""
        return "bootstrap" if self.bootstrap else "delong"

    def ci(self, y: np.ndarray, score: np.ndarray) -> AucCI:
        """AUC with its 95% CI by the configured method."""
        if self.bootstrap:
            return auc_ci(y, score, method="bootstrap", n_boot=self.bootstrap, seed=self.seed)
        return auc_ci(y, score, method="delong")


def num(value: float | int | np.floating[Any] | None) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, NaN or infinite."""
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _auc_dict(ci: AucCI) -> dict[str, Any]:
    return {"auc": num(ci.auc), "low": num(ci.low), "high": num(ci.high), "se": num(ci.se),
            "method": ci.method}


def _scores(scored: Scored) -> dict[str, dict[str, np.ndarray]]:
    return {"comparators": {k: np.asarray(v, np.float64) for k, v in scored.comparators.items()},
            "reference": {k: np.asarray(v, np.float64) for k, v in scored.reference.items()}}


def outcome_of(scored: Scored) -> np.ndarray:
    """The outcomes as int64 0/1."""
    return np.asarray(scored.y).astype(np.int64)


def auc_table(scored: Scored, settings: AucSettings) -> dict[str, Any]:
    """AUC with 95% CI of the model, every comparator and every reference."""
    y = outcome_of(scored)
    out: dict[str, Any] = {"model": _auc_dict(settings.ci(y, np.asarray(scored.prob)))}
    for kind, table in _scores(scored).items():
        out[kind] = {name: _auc_dict(settings.ci(y, score)) for name, score in table.items()}
    return out


def delong_table(scored: Scored) -> dict[str, Any]:
    """DeLong test of the model against each ``tested`` comparator."""
    y = outcome_of(scored)
    out: dict[str, Any] = {}
    for name in scored.tested:
        res = delong_test(y, np.asarray(scored.prob), np.asarray(scored.comparators[name]))
        out[name] = {"auc_model": num(res.auc_a), "auc_comparator": num(res.auc_b),
                     "diff": num(res.diff), "diff_low": num(res.diff_low),
                     "diff_high": num(res.diff_high), "z": num(res.z),
                     "p_value": num(res.p_value)}
    return out


def ratio_table(aucs: dict[str, Any]) -> dict[str, float | None]:
    """Model AUC divided by each reference AUC."""
    model = aucs["model"]["auc"]
    out: dict[str, float | None] = {}
    for name, ref in aucs["reference"].items():
        out[name] = num(model / ref["auc"]) if model is not None and ref["auc"] else None
    return out


def per_centre(scored: Scored, settings: AucSettings) -> list[dict[str, Any]]:
    """AUC with CI, case count and events of each centre (sorted by centre name)."""
    y = outcome_of(scored)
    prob = np.asarray(scored.prob, np.float64)
    centres = np.asarray(scored.centres, dtype=object)
    rows: list[dict[str, Any]] = []
    for centre in sorted(set(scored.centres)):
        mask = centres == centre
        n, events = int(mask.sum()), int(y[mask].sum())
        row: dict[str, Any] = {"centre": centre, "n": n, "events": events}
        if events in (0, n):
            row.update(estimable=False, reason=f"one class only ({events} events of {n})")
        else:
            try:
                row.update(estimable=True, **_auc_dict(settings.ci(y[mask], prob[mask])))
            except StatsError as exc:
                row.update(estimable=False, reason=str(exc))
        rows.append(row)
    return rows


def _proportion(p: Proportion) -> dict[str, Any]:
    return {"estimate": num(p.estimate), "low": num(p.low), "high": num(p.high),
            "count": p.count, "total": p.total}


def at_threshold(scored: Scored) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV (Wilson 95% CIs) at the fixed threshold."""
    res = threshold_metrics(outcome_of(scored), np.asarray(scored.prob), scored.threshold)
    return {"threshold": res.threshold, "tp": res.tp, "fp": res.fp, "tn": res.tn, "fn": res.fn,
            "ci_method": res.ci_method, "sensitivity": _proportion(res.sensitivity),
            "specificity": _proportion(res.specificity), "ppv": _proportion(res.ppv),
            "npv": _proportion(res.npv)}


def _calibration_one(y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    try:
        cal = calibration(y, prob)
    except StatsError as exc:
        return {"estimable": False, "reason": str(exc)}
    return {"estimable": True, "intercept": num(cal.intercept),
            "intercept_low": num(cal.intercept_low), "intercept_high": num(cal.intercept_high),
            "slope": num(cal.slope), "slope_low": num(cal.slope_low),
            "slope_high": num(cal.slope_high), "brier": num(cal.brier),
            "brier_scaled": num(cal.brier_scaled), "mean_predicted": num(cal.mean_predicted),
            "prevalence": num(cal.prevalence)}


def calibration_table(scored: Scored) -> dict[str, Any]:
    """Calibration intercept, slope and Brier score of the model, comparators, references."""
    y = outcome_of(scored)
    out: dict[str, Any] = {"model": _calibration_one(y, np.asarray(scored.prob, np.float64))}
    for kind, table in _scores(scored).items():
        out[kind] = {name: _calibration_one(y, score) for name, score in table.items()}
    return out


def decision_table(scored: Scored) -> dict[str, Any]:
    """Net benefit over :data:`DCA_THRESHOLDS` of the model, treat-all/none and comparators."""
    y = outcome_of(scored)
    curve = decision_curve(y, np.asarray(scored.prob, np.float64), DCA_THRESHOLDS)
    scores = _scores(scored)
    return {"thresholds": [float(t) for t in curve.thresholds],
            "model": [num(v) for v in curve.model],
            "treat_all": [num(v) for v in curve.treat_all],
            "treat_none": [num(v) for v in curve.treat_none],
            "comparators": {name: [num(v) for v in net_benefit(y, s, DCA_THRESHOLDS)]
                            for name, s in scores["comparators"].items()},
            "reference": {name: [num(v) for v in net_benefit(y, s, DCA_THRESHOLDS)]
                          for name, s in scores["reference"].items()}}


def survival_table(scored: Scored) -> dict[str, Any] | None:
    """Harrell's C of ``risk_for_survival`` and time-dependent AUC at 12/24/36 months."""
    if scored.time_months is None or scored.event is None or scored.risk_for_survival is None:
        return None
    time = np.asarray(scored.time_months, np.float64)
    event = np.asarray(scored.event).astype(np.int64)
    risk = np.asarray(scored.risk_for_survival, np.float64)
    out: dict[str, Any] = {"n": int(time.size), "events": int(event.sum()),
                           "median_follow_up_months": num(float(np.median(time)))}
    try:
        c = harrell_c(time, event, risk)
        out["c_index"] = {"estimable": True, "c_index": num(c.c_index),
                          "concordant": c.concordant, "discordant": c.discordant,
                          "tied_risk": c.tied_risk}
    except StatsError as exc:
        out["c_index"] = {"estimable": False, "reason": str(exc)}
    horizons: list[dict[str, Any]] = []
    for h in HORIZONS_MONTHS:
        try:
            td = time_dependent_auc(time, event, risk, [h])
            horizons.append({"months": h, "estimable": True, "auc": num(td.auc[0])})
        except StatsError as exc:
            horizons.append({"months": h, "estimable": False, "reason": str(exc)})
    out["time_dependent_auc"] = horizons
    return out
