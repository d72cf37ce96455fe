"""Tests of ml.stats against published values, brute-force definitions and hand examples."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from scipy.special import expit
from scipy.stats import beta, norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from ml.stats.auc import auc_ci, delong_covariance, delong_test
from ml.stats.calibration import calibration
from ml.stats.decision import decision_curve, net_benefit
from ml.stats.inputs import StatsError
from ml.stats.plots import plot_calibration, plot_decision_curve, plot_roc
from ml.stats.survival import harrell_c, time_dependent_auc
from ml.stats.threshold import proportion, threshold_from_training, threshold_metrics

ASAH = Path(__file__).parent / "data" / "asah.csv"

# ---------------------------------------------------------------------------------------
# AUC and DeLong: published values (pROC on its aSAH data set)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asah() -> dict[str, npt.NDArray[np.float64]]:
    lines = [line for line in ASAH.read_text().splitlines() if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    return {name: np.array([float(r[name]) for r in rows]) for name in rows[0]}


def test_asah_fixture_shape(asah: dict[str, npt.NDArray[np.float64]]) -> None:
    assert asah["outcome_poor"].size == 113
    assert int(asah["outcome_poor"].sum()) == 41


def test_delong_reproduces_proc_variances_and_covariances(
        asah: dict[str, npt.NDArray[np.float64]]) -> None:
    # pROC tests/testthat/helper-roc-expected.R (ndka AUC), pROC docs (s100b, wfns AUC),
    # tests/testthat/test-var.R and test-cov.R (DeLong var / cov).
    aucs, cov = delong_covariance(asah["outcome_poor"],
                                  [asah["s100b"], asah["wfns"], asah["ndka"]])
    np.testing.assert_allclose(aucs, [0.7313685636856369, 0.8236788617886179,
                                      0.61195799457994582], rtol=1e-12)
    np.testing.assert_allclose(np.diag(cov), [0.00266868245717244, 0.00146991470882363,
                                              0.0031908105493913], rtol=1e-10)
    assert cov[0, 1] == pytest.approx(0.00119615567376754, rel=1e-10)
    assert cov[2, 0] == pytest.approx(-0.000756164938056579, rel=1e-10)
    assert cov[1, 2] == pytest.approx(-0.000532967856762438, rel=1e-10)
    np.testing.assert_allclose(cov, cov.T, rtol=0, atol=0)


@pytest.mark.parametrize(("a", "b", "z", "p", "low", "high"), [
    # pROC tests/testthat/test-roc.test.R, roc.test(r.wfns, r.s100b) etc. (DeLong, paired)
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882,
     0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098,
     0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054,
     -0.2876917446341914, 0.0488706064228094),
])
def test_delong_test_reproduces_proc_roc_test(asah: dict[str, npt.NDArray[np.float64]],
                                              a: str, b: str, z: float, p: float,
                                              low: float, high: float) -> None:
    y = asah["outcome_poor"]
    res = delong_test(y, asah[a], asah[b])
    assert res.z == pytest.approx(z, rel=1e-10)
    assert res.p_value == pytest.approx(p, rel=1e-9)
    assert (res.diff_low, res.diff_high) == pytest.approx((low, high), rel=1e-9)
    assert res.diff == pytest.approx(res.auc_a - res.auc_b, abs=1e-15)
    swapped = delong_test(y, asah[b], asah[a])
    assert swapped.z == pytest.approx(-z, rel=1e-10)
    assert swapped.p_value == pytest.approx(p, rel=1e-9)


def test_auc_ci_delong_reproduces_proc_ci_auc(asah: dict[str, npt.NDArray[np.float64]]) -> None:
    # pROC tests/testthat/test-ci.auc.R: ci.auc(r.ndka)
    ci = auc_ci(asah["outcome_poor"], asah["ndka"])
    assert (ci.low, ci.auc, ci.high) == pytest.approx(
        (0.501244999271703, 0.611957994579946, 0.722670989888189), rel=1e-12)
    assert ci.se == pytest.approx(math.sqrt(0.0031908105493913), rel=1e-10)


# ---------------------------------------------------------------------------------------
# AUC and DeLong: brute force, edge cases, bootstrap
# ---------------------------------------------------------------------------------------


def _brute_force_delong(y: npt.NDArray[np.int64], scores: npt.NDArray[np.float64],
                        ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """DeLong 1988 by definition: psi over all m*n pairs, no ranks."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    v10 = np.empty((scores.shape[0], m))
    v01 = np.empty((scores.shape[0], n))
    for k in range(scores.shape[0]):
        psi = np.zeros((m, n))
        for i in range(m):
            for j in range(n):
                psi[i, j] = 1.0 if pos[k, i] > neg[k, j] else 0.5 if pos[k, i] == neg[k, j] else 0.0
        v10[k], v01[k] = psi.mean(axis=1), psi.mean(axis=0)
    s10 = (v10 - v10.mean(1, keepdims=True)) @ (v10 - v10.mean(1, keepdims=True)).T / (m - 1)
    s01 = (v01 - v01.mean(1, keepdims=True)) @ (v01 - v01.mean(1, keepdims=True)).T / (n - 1)
    return v10.mean(axis=1), s10 / m + s01 / n


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_delong_matches_brute_force_structural_components(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 90)
    a = np.round(y * 0.8 + rng.normal(0, 1, 90), 1)        # many ties across classes
    b = np.round(0.6 * a + rng.normal(0, 0.7, 90), 0)      # heavy ties, correlated with a
    c = rng.normal(0, 1, 90)                               # no signal, no ties
    scores = np.vstack([a, b, c])
    aucs, cov = delong_covariance(y, list(scores))
    ref_aucs, ref_cov = _brute_force_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-16)
    for k in range(3):
        assert aucs[k] == pytest.approx(roc_auc_score(y, scores[k]), abs=1e-12)


def test_perfect_separation_gives_auc_one_with_collapsed_ci() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.8, 0.9])
    for method in ("delong", "bootstrap"):
        ci = auc_ci(y, score, method=method, n_boot=200)
        assert (ci.auc, ci.low, ci.high, ci.se) == (1.0, 1.0, 1.0, 0.0)
    flipped = auc_ci(y, -score)
    assert (flipped.auc, flipped.low, flipped.high) == (0.0, 0.0, 0.0)


def test_constant_scores_give_half_and_identical_scores_test_p_one() -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 0])
    ci = auc_ci(y, np.full(7, 0.3))
    assert (ci.auc, ci.low, ci.high) == (0.5, 0.5, 0.5)
    score = np.array([0.2, 0.4, 0.4, 0.9, 0.1, 0.3, 0.5])
    same = delong_test(y, score, score.copy())
    assert (same.diff, same.z, same.p_value) == (0.0, 0.0, 1.0)
    # Perfect vs constant: no variance at all, but a real difference.
    perfect = np.where(y == 1, 1.0, 0.0)
    res = delong_test(y, perfect, np.zeros(7))
    assert (res.diff, res.z, res.p_value) == (0.5, math.inf, 0.0)


def test_ties_count_one_half() -> None:
    y = np.array([1, 0, 1, 0])
    # events 0.5, 0.9 vs non-events 0.5, 0.1: pairs 0.5 + 1 + 1 + 1 -> 3.5 / 4
    assert auc_ci(y, np.array([0.5, 0.5, 0.9, 0.1])).auc == pytest.approx(0.875)


def test_bootstrap_is_seeded_and_close_to_delong(asah: dict[str, npt.NDArray[np.float64]],
                                                 ) -> None:
    y, s = asah["outcome_poor"], asah["s100b"]
    first = auc_ci(y, s, method="bootstrap", n_boot=2000, seed=7)
    again = auc_ci(y, s, method="bootstrap", n_boot=2000, seed=7)
    other = auc_ci(y, s, method="bootstrap", n_boot=2000, seed=8)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    delong = auc_ci(y, s)
    assert first.auc == delong.auc
    assert first.low < first.auc < first.high
    assert first.se == pytest.approx(delong.se, rel=0.15)
    assert first.low == pytest.approx(delong.low, abs=0.03)
    assert first.high == pytest.approx(delong.high, abs=0.03)


def test_auc_refuses_bad_input() -> None:
    with pytest.raises(StatsError, match="both classes"):
        auc_ci([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(StatsError, match="other than 0/1"):
        auc_ci([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(StatsError, match="at least 2 events"):
        auc_ci([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(StatsError, match="non-finite values"):
        auc_ci([0, 0, 1, 1], [0.1, np.nan, 0.3, 0.4])
    with pytest.raises(StatsError, match="shape"):
        delong_test([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    with pytest.raises(StatsError, match="unknown AUC CI method"):
        auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], method="hanley")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Threshold metrics
# ---------------------------------------------------------------------------------------


def _wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    z = norm.ppf(1 - alpha / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_threshold_metrics_on_a_hand_computed_table() -> None:
    # 10 events, 12 non-events; at threshold 0.5: TP 8, FN 2, FP 3, TN 9.
    y = np.array([1] * 10 + [0] * 12)
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.5, 0.95, 0.2, 0.49,
                      0.5, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4, 0.45, 0.49, 0.0, 0.3, 0.2])
    m = threshold_metrics(y, score, 0.5)
    assert (m.tp, m.fn, m.fp, m.tn) == (8, 2, 3, 9)
    assert m.sensitivity.estimate == pytest.approx(8 / 10)
    assert m.specificity.estimate == pytest.approx(9 / 12)
    assert m.ppv.estimate == pytest.approx(8 / 11)
    assert m.npv.estimate == pytest.approx(9 / 11)
    for prop, (k, n) in ((m.sensitivity, (8, 10)), (m.specificity, (9, 12)),
                         (m.ppv, (8, 11)), (m.npv, (9, 11))):
        assert (prop.count, prop.total) == (k, n)
        assert (prop.low, prop.high) == pytest.approx(_wilson(k, n), abs=1e-12)
    exact = threshold_metrics(y, score, 0.5, method="exact").sensitivity
    # Clopper-Pearson by its beta-quantile definition.
    assert exact.low == pytest.approx(beta.ppf(0.025, 8, 3), abs=1e-9)
    assert exact.high == pytest.approx(beta.ppf(0.975, 9, 2), abs=1e-9)


def test_threshold_metrics_with_no_positive_call_gives_nan_ppv() -> None:
    m = threshold_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert (m.tp, m.fp) == (0, 0)
    assert math.isnan(m.ppv.estimate) and math.isnan(m.ppv.low)
    assert m.sensitivity.estimate == 0.0 and m.sensitivity.low == 0.0
    assert proportion(0, 5).high == pytest.approx(_wilson(0, 5)[1])


def test_threshold_from_training_rules() -> None:
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 0, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    # Youden by hand over ">= t": t=0.5 -> sens 4/4, spec 4/6 -> J 0.667; t=0.7 -> 3/4 + 5/6 - 1
    # = 0.583; t=0.95 -> 1/4 + 1 - 1 = 0.25; so 0.5.
    assert threshold_from_training(y, score, "youden") == 0.5
    assert threshold_from_training(y, score, "sensitivity>=0.75") == 0.7
    assert threshold_from_training(y, score, "sensitivity >= 1") == 0.5
    assert threshold_from_training(y, score, "specificity>=0.8") == 0.7
    assert threshold_from_training(y, score, "specificity>=1.0") == 0.95
    with pytest.raises(StatsError, match="unknown threshold rule"):
        threshold_from_training(y, score, "accuracy>=0.9")
    with pytest.raises(StatsError, match="not in"):
        threshold_from_training(y, score, "sensitivity>=1.5")
    with pytest.raises(StatsError, match="no training score"):
        threshold_from_training([0, 1, 0], [0.1, 0.5, 0.9], "specificity>=1")


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------


def _simulate(n: int, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.0, 1.5, n)
    return (rng.random(n) < expit(lp)).astype(np.int64), lp


def test_calibration_of_a_perfectly_calibrated_predictor() -> None:
    y, lp = _simulate(5000, 0)
    cal = calibration(y, expit(lp))
    assert abs(cal.intercept) < 0.1 and cal.intercept_low < 0.0 < cal.intercept_high
    assert abs(cal.slope - 1.0) < 0.1 and cal.slope_low < 1.0 < cal.slope_high
    assert cal.brier == pytest.approx(np.mean((expit(lp) - y) ** 2), abs=1e-15)
    assert cal.brier_scaled == pytest.approx(1 - cal.brier / (y.mean() * (1 - y.mean())))
    np.testing.assert_allclose(cal.bin_observed, cal.bin_predicted, atol=0.05)


def test_calibration_detects_overfitted_and_shifted_predictions() -> None:
    y, lp = _simulate(5000, 1)
    too_extreme = calibration(y, expit(2.0 * lp))
    assert too_extreme.slope == pytest.approx(0.5, abs=0.05)
    too_high = calibration(y, expit(lp + 1.0))
    assert too_high.intercept == pytest.approx(-1.0, abs=0.1)
    assert too_high.slope == pytest.approx(1.0, abs=0.1)
    # The intercept solves the offset-logistic score equation exactly.
    assert np.mean(expit(too_high.intercept + lp + 1.0)) == pytest.approx(y.mean(), abs=1e-9)


@pytest.mark.parametrize("strategy", ["quantile", "uniform"])
def test_reliability_bins_match_sklearn(strategy: str) -> None:
    y, lp = _simulate(800, 2)
    prob = expit(lp)
    cal = calibration(y, prob, n_bins=8, strategy=strategy)  # type: ignore[arg-type]
    obs, pred = calibration_curve(y, prob, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(cal.bin_observed, obs, rtol=1e-12)
    np.testing.assert_allclose(cal.bin_predicted, pred, rtol=1e-12)
    assert int(cal.bin_count.sum()) == 800
    assert np.all(cal.bin_observed_low <= cal.bin_observed)
    assert np.all(cal.bin_observed <= cal.bin_observed_high)


def test_calibration_refuses_bad_probabilities() -> None:
    with pytest.raises(StatsError, match=r"outside \[0, 1\]"):
        calibration([0, 1, 0, 1], [0.1, 1.2, 0.3, 0.4])
    with pytest.raises(StatsError, match="not identifiable"):
        calibration([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3])


# ---------------------------------------------------------------------------------------
# Decision curves
# ---------------------------------------------------------------------------------------


def test_net_benefit_on_a_hand_example() -> None:
    # n = 10, 3 events. At pt = 0.25 the patients with prob >= 0.25 are those at
    # 0.9 (event), 0.6 (event), 0.4 (no), 0.3 (no), 0.25 (no): TP 2, FP 3.
    # NB = 2/10 - 3/10 * 0.25/0.75 = 0.2 - 0.1 = 0.1; treat all = 0.3 - 0.7/3.
    y = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    prob = np.array([0.9, 0.6, 0.4, 0.3, 0.25, 0.2, 0.1, 0.1, 0.05, 0.0])
    curve = decision_curve(y, prob, [0.25, 0.5])
    assert curve.model[0] == pytest.approx(0.1)
    assert curve.treat_all[0] == pytest.approx(0.3 - 0.7 / 3)
    # pt = 0.5: TP 2 (0.9, 0.6), FP 0 -> 0.2; treat all 0.3 - 0.7 = -0.4.
    assert curve.model[1] == pytest.approx(0.2)
    assert curve.treat_all[1] == pytest.approx(-0.4)
    assert np.all(curve.treat_none == 0.0)
    # A model that calls everyone positive is treat-all.
    np.testing.assert_allclose(net_benefit(y, np.ones(10), curve.thresholds), curve.treat_all)
    with pytest.raises(StatsError, match="not in"):
        net_benefit(y, prob, [0.0, 0.5])


# ---------------------------------------------------------------------------------------
# Survival
# ---------------------------------------------------------------------------------------


def _simulate_survival(n: int, seed: int, discrete: bool,
                       ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64],
                                  npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(0, 1, n)
    event_time = rng.exponential(24.0 * np.exp(-0.8 * risk))
    censor_time = rng.uniform(6.0, 72.0, n)
    time = np.minimum(event_time, censor_time)
    if discrete:
        time, risk = np.ceil(time), np.round(risk, 1)  # ties in time and in risk
    return time, (event_time <= censor_time).astype(np.int64), risk


def _brute_force_harrell(time: npt.NDArray[np.float64], event: npt.NDArray[np.int64],
                         risk: npt.NDArray[np.float64]) -> float:
    num = den = 0.0
    for i in range(time.size):
        if not event[i]:
            continue
        for j in range(time.size):
            if time[j] > time[i] or (time[j] == time[i] and not event[j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


@pytest.mark.parametrize("discrete", [False, True])
def test_harrell_c_matches_its_definition(discrete: bool) -> None:
    time, event, risk = _simulate_survival(150, 4, discrete)
    res = harrell_c(time, event, risk)
    assert res.c_index == pytest.approx(_brute_force_harrell(time, event, risk), abs=1e-12)
    assert 0.6 < res.c_index < 0.8
    assert (res.tied_risk > 0) == discrete
    assert harrell_c(time, event, -risk).c_index == pytest.approx(1.0 - res.c_index, abs=1e-12)


def test_time_dependent_auc_without_censoring_is_the_binary_auc() -> None:
    rng = np.random.default_rng(5)
    risk = rng.normal(0, 1, 200)
    time = rng.exponential(24.0 * np.exp(-0.8 * risk))
    res = time_dependent_auc(time, np.ones(200), risk, [12.0, 36.0])
    for k, t in enumerate((12.0, 36.0)):
        assert res.auc[k] == pytest.approx(roc_auc_score(time <= t, risk), abs=1e-12)


def _brute_force_ipcw_auc(time: npt.NDArray[np.float64], event: npt.NDArray[np.int64],
                          risk: npt.NDArray[np.float64], t: float) -> float:
    """Uno 2007 / Hung-Chiang 2010 cumulative/dynamic AUC with a hand Kaplan-Meier G."""
    def g(s: float) -> float:
        censored = np.sort(time[(event == 0) & (time <= s)])
        return float(np.prod([1.0 - 1.0 / np.sum(time >= c) for c in censored]))

    cases = np.flatnonzero((time <= t) & (event == 1))
    controls = np.flatnonzero(time > t)
    weights = np.array([1.0 / g(time[i]) for i in cases])
    pair = (risk[cases][:, None] > risk[controls][None, :]) \
        + 0.5 * (risk[cases][:, None] == risk[controls][None, :])
    return float((weights @ pair).sum() / (weights.sum() * controls.size))


def test_time_dependent_auc_matches_ipcw_definition() -> None:
    time, event, risk = _simulate_survival(200, 6, discrete=False)
    assert 0.2 < 1 - event.mean() < 0.8
    res = time_dependent_auc(time, event, risk, [36.0, 12.0, 24.0])
    np.testing.assert_array_equal(res.horizons, [12.0, 24.0, 36.0])
    for k, t in enumerate(res.horizons):
        assert res.auc[k] == pytest.approx(_brute_force_ipcw_auc(time, event, risk, t),
                                           abs=1e-12)
    assert res.auc.min() <= res.mean_auc <= res.auc.max()
    with pytest.raises(StatsError, match="follow-up"):
        time_dependent_auc(time, event, risk, [time.max()])
    with pytest.raises(StatsError, match="both train_time and train_event"):
        time_dependent_auc(time, event, risk, [12.0], train_time=time)


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def test_plots_write_readable_pngs(tmp_path: Path,
                                   asah: dict[str, npt.NDArray[np.float64]]) -> None:
    y = asah["outcome_poor"]
    roc = plot_roc(y, {"wfns": asah["wfns"], "s100b": asah["s100b"]},
                   tmp_path / "figs" / "roc.png", n_boot=50)
    yc, lp = _simulate(600, 3)
    probs = {"calibrated": expit(lp), "overfitted": expit(2 * lp)}
    cal = plot_calibration(yc, probs, tmp_path / "cal.png")
    dca = plot_decision_curve(yc, probs, tmp_path / "dca.png")
    for path in (roc, cal, dca):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            assert img.size[0] > 400 and img.size[1] > 400
            assert np.unique(np.asarray(img.convert("L"))).size > 10  # not blank
    with pytest.raises(StatsError, match="at least one"):
        plot_roc(y, {}, tmp_path / "none.png")
