"""Evaluate a :class:`~ml.evaluate.scored.Scored` test set and write its report.

:func:`evaluate_scored` computes discrimination (AUC with CIs, DeLong tests,
per-centre AUC), classification at the training threshold, calibration,
decision curves and, for time-to-event outcomes, Harrell's C and time-dependent
AUC, all through :mod:`ml.stats`; then writes ``metrics.json``, ``roc.png``,
``calibration.png``, ``decision_curve.png`` and ``report.md`` into one folder.
Patient identifiers are never written or logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import ConfigError
from ml.evaluate import metrics as m
from ml.evaluate.report import write_report
from ml.evaluate.scored import Scored
from ml.stats.plots import plot_calibration, plot_decision_curve, plot_roc

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
DECISION_FILE = "decision_curve.png"
REPORT_FILE = "report.md"

_ROC_BAND_MAX_CURVES = 2
"""Bootstrap bands are shaded only when the ROC figure has at most this many curves."""


def _write_figures(scored: Scored, out: Path, calib: dict[str, Any], seed: int,
                   ) -> dict[str, str]:
    """Draw the ROC, calibration and decision-curve PNGs; return file names by figure."""
    y = m.outcome_of(scored)
    model = {f"model ({scored.model_name})": np.asarray(scored.prob, np.float64)}
    comps = {k: np.asarray(v, np.float64) for k, v in scored.comparators.items()}
    refs = {k: np.asarray(v, np.float64) for k, v in scored.reference.items()}
    every = {**model, **comps, **refs}
    title = f"{scored.outcome_name} (n={scored.n})"
    files: dict[str, str] = {}
    plot_roc(y, every, out / ROC_FILE, title=f"ROC: {title}",
             band=len(every) <= _ROC_BAND_MAX_CURVES, seed=seed)
    files["roc"] = ROC_FILE
    calibrated = {name: p for name, p in {**model, **refs}.items()
                  if (calib["model"] if name in model else calib["reference"][name])["estimable"]}
    if calibrated:
        plot_calibration(y, calibrated, out / CALIBRATION_FILE, title=f"Calibration: {title}")
        files["calibration"] = CALIBRATION_FILE
    else:
        log.warning("no probabilities with an estimable calibration: %s not drawn",
                    CALIBRATION_FILE)
    plot_decision_curve(y, {**model, **comps, **refs}, out / DECISION_FILE,
                        title=f"Decision curve: {title}", thresholds=m.DCA_THRESHOLDS)
    files["decision_curve"] = DECISION_FILE
    return files


def _split_json(split: dict[str, object]) -> dict[str, Any]:
    """The split description, made JSON-safe (unknown objects become strings)."""
    text = json.dumps(split, default=str)
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def compute_metrics(scored: Scored, *, bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Return every figure of the evaluation as a JSON-ready dict (no files written).

    Parameters
    ----------
    scored : Scored
        The validated test-set scores.
    bootstrap : int
        0 for DeLong AUC CIs, else the number of stratified bootstrap resamples (>= 2).
    seed : int
        Seed of the bootstrap and of the ROC bands.

    Returns
    -------
    dict
        Keys ``model``, ``task``, ``outcome``, ``n``, ``events``, ``prevalence``,
        ``centres``, ``split``, ``notes``, ``auc``, ``delong``, ``ratio_to_reference``,
        ``per_centre``, ``threshold``, ``calibration``, ``decision_curve``, ``survival``.

    Raises
    ------
    ml.errors.ConfigError
        If ``bootstrap`` is 1 or negative.
    ml.stats.inputs.StatsError
        If the data cannot give an overall AUC (fewer than 2 cases of a class).
    """
    if bootstrap < 0 or bootstrap == 1:
        raise ConfigError(f"bootstrap must be 0 (DeLong CIs) or at least 2 resamples, "
                          f"got {bootstrap}")
    settings = m.AucSettings(bootstrap=bootstrap, seed=seed)
    y = m.outcome_of(scored)
    aucs = m.auc_table(scored, settings)
    return {
        "model": scored.model_name, "task": scored.task, "outcome": scored.outcome_name,
        "n": scored.n, "events": int(y.sum()), "prevalence": float(y.mean()),
        "centres": sorted(set(scored.centres)), "split": _split_json(scored.split),
        "notes": list(scored.notes),
        "auc_ci_method": settings.method,
        "bootstrap_resamples": bootstrap, "seed": seed,
        "auc": aucs,
        "delong": m.delong_table(scored),
        "ratio_to_reference": m.ratio_table(aucs),
        "per_centre": m.per_centre(scored, settings),
        "threshold": m.at_threshold(scored),
        "calibration": m.calibration_table(scored),
        "decision_curve": m.decision_table(scored),
        "survival": m.survival_table(scored),
    }


def evaluate_scored(scored: Scored, out: Path, *, bootstrap: int = 0, seed: int = 0,
                    ) -> dict[str, Any]:
    """Compute the metrics of ``scored`` and write them, the figures and the report.

    Parameters
    ----------
    scored : Scored
        The model's test-set scores with comparators and references.
    out : pathlib.Path
        Folder to write into (created if missing; existing files are replaced).
    bootstrap : int
        0 for DeLong AUC CIs, else the number of stratified bootstrap resamples.
    seed : int
        Seed of the bootstrap and of the ROC bands.

    Returns
    -------
    dict
        The metrics of :func:`compute_metrics` plus ``files`` (name to path).

    Raises
    ------
    ml.errors.ConfigError
        If ``bootstrap`` is invalid or ``out`` is a file.
    ml.stats.inputs.StatsError
        If the data cannot give an overall AUC.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"evaluation output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    result = compute_metrics(scored, bootstrap=bootstrap, seed=seed)
    files = _write_figures(scored, out, result["calibration"], seed)
    files["metrics"] = METRICS_FILE
    files["report"] = REPORT_FILE
    result["files"] = {name: str(out / file) for name, file in files.items()}
    (out / METRICS_FILE).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n",
                                    encoding="utf-8")
    write_report(result, out / REPORT_FILE, figures=files)
    log.info("evaluated %s on %d cases: AUC %.3f; wrote %s", scored.model_name, scored.n,
             result["auc"]["model"]["auc"], out)
    return result
