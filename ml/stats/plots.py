"""ROC, calibration and decision-curve figures written as PNG files.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, not
through ``pyplot``, so no global state or display is involved and the functions
are safe to call from worker threads. Each function returns the saved path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ml.stats.auc import auc_ci
from ml.stats.calibration import BinStrategy, calibration
from ml.stats.decision import DEFAULT_THRESHOLDS, decision_curve
from ml.stats.inputs import FloatArray, StatsError, binary_outcome, finite_scores

log = logging.getLogger(__name__)

_FPR_GRID: FloatArray = np.linspace(0.0, 1.0, 101)


def _figure() -> Figure:
    fig = Figure(figsize=(5.5, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    log.info("wrote figure %s", path.name)
    return path


def _roc_band(y: npt.NDArray[np.int64], score: FloatArray, n_boot: int, seed: int,
              alpha: float) -> tuple[FloatArray, FloatArray]:
    """Pointwise percentile band of sensitivity on ``_FPR_GRID`` (stratified bootstrap)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    curves = np.empty((n_boot, _FPR_GRID.size))
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        fpr, tpr, _ = roc_curve(y[idx], score[idx])
        curves[b] = np.interp(_FPR_GRID, fpr, tpr)
    low, high = np.quantile(curves, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return low, high


def plot_roc(y: npt.ArrayLike, scores: Mapping[str, npt.ArrayLike], path: Path,
             title: str = "ROC", band: bool = True, n_boot: int = 300, seed: int = 0,
             alpha: float = 0.05) -> Path:
    """Draw the ROC curve of each named score on the same cases.

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    scores : mapping of str to array_like
        Model name to scores (e.g. ``{"multimodal": p, "TNM stage": stage}``).
    path : pathlib.Path
        PNG file to write (parent folders are created).
    title : str
        Figure title.
    band : bool
        Shade a pointwise ``1 - alpha`` stratified-bootstrap band around each curve.
    n_boot, seed : int
        Bootstrap resamples and seed for the band.
    alpha : float
        One minus the confidence level of the band and of the DeLong AUC CI in the legend.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StatsError
        If ``scores`` is empty or any input is invalid.
    """
    if not scores:
        raise StatsError("plot_roc needs at least one score")
    outcome = binary_outcome(y)
    fig = _figure()
    ax = fig.subplots()
    for name, raw in scores.items():
        score = finite_scores(raw, outcome.size, name)
        ci = auc_ci(outcome, score, alpha=alpha)
        fpr, tpr, _ = roc_curve(outcome, score)
        line = ax.plot(fpr, tpr, lw=1.8,
                       label=f"{name}: AUC {ci.auc:.3f} ({ci.low:.3f}-{ci.high:.3f})")[0]
        if band:
            low, high = _roc_band(outcome, score, n_boot, seed, alpha)
            ax.fill_between(_FPR_GRID, low, high, color=line.get_color(), alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", title=title,
           xlabel="1 - specificity", ylabel="sensitivity")
    ax.legend(loc="lower right", fontsize="small",
              title=f"AUC ({100 * (1 - alpha):.0f}% DeLong CI)", title_fontsize="small")
    return _save(fig, path)


def plot_calibration(y: npt.ArrayLike, probs: Mapping[str, npt.ArrayLike], path: Path,
                     title: str = "Calibration", n_bins: int = 10,
                     strategy: BinStrategy = "quantile") -> Path:
    """Draw binned reliability curves (observed vs predicted event rate) per model.

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    probs : mapping of str to array_like
        Model name to predicted probabilities.
    path : pathlib.Path
        PNG file to write.
    title : str
        Figure title.
    n_bins : int
        Reliability bins.
    strategy : {"quantile", "uniform"}
        Bin strategy (see :func:`ml.stats.calibration.calibration`).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StatsError
        If ``probs`` is empty or any input is invalid.
    """
    if not probs:
        raise StatsError("plot_calibration needs at least one model")
    fig = _figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="ideal")
    for name, prob in probs.items():
        cal = calibration(y, prob, n_bins=n_bins, strategy=strategy)
        err = np.vstack([cal.bin_observed - cal.bin_observed_low,
                         cal.bin_observed_high - cal.bin_observed])
        ax.errorbar(cal.bin_predicted, cal.bin_observed, yerr=err, marker="o", ms=4,
                    capsize=2, lw=1.5,
                    label=f"{name}: intercept {cal.intercept:+.2f}, slope {cal.slope:.2f}, "
                          f"Brier {cal.brier:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=title,
           xlabel="predicted probability", ylabel="observed event rate")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def plot_decision_curve(y: npt.ArrayLike, probs: Mapping[str, npt.ArrayLike], path: Path,
                        title: str = "Decision curve",
                        thresholds: npt.ArrayLike = DEFAULT_THRESHOLDS) -> Path:
    """Draw net benefit against threshold probability for each model, treat-all and treat-none.

    Parameters
    ----------
    y : array_like
        0/1 outcomes.
    probs : mapping of str to array_like
        Model name to predicted probabilities.
    path : pathlib.Path
        PNG file to write.
    title : str
        Figure title.
    thresholds : array_like
        Threshold probabilities in (0, 1).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StatsError
        If ``probs`` is empty or any input is invalid.
    """
    if not probs:
        raise StatsError("plot_decision_curve needs at least one model")
    fig = _figure()
    ax = fig.subplots()
    curves = {name: decision_curve(y, prob, thresholds) for name, prob in probs.items()}
    ref = next(iter(curves.values()))
    ax.plot(ref.thresholds, ref.treat_all, color="grey", lw=1.2, label="treat all")
    ax.plot(ref.thresholds, ref.treat_none, color="black", lw=1.2, ls="--", label="treat none")
    for name, curve in curves.items():
        ax.plot(curve.thresholds, curve.model, lw=1.8, label=name)
    top = max(ref.prevalence, max(float(c.model.max()) for c in curves.values()))
    ax.set(xlim=(float(ref.thresholds[0]), float(ref.thresholds[-1])),
           ylim=(-0.05 * max(top, 0.01), 1.1 * max(top, 0.01)), title=title,
           xlabel="threshold probability", ylabel="net benefit")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)
