"""Tests of ml.evaluate: the Scored contract, evaluate_scored, the report and the CLI.

Figures are compared with direct calls to ml.stats on the same arrays (ml.stats has
its own tests against published values); here we check that the evaluation wires
the right arrays into the right statistic and writes what it computed.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit

from ml.errors import ConfigError
from ml.evaluate import cli
from ml.evaluate import metrics as m
from ml.evaluate.report import fmt_p
from ml.evaluate.run import compute_metrics, evaluate_scored
from ml.evaluate.scored import Scored, ScoredError
from ml.evaluate.tripod import AUTHORS, TRIPOD_AI_ITEMS
from ml.stats.auc import auc_ci, delong_test
from ml.stats.calibration import calibration
from ml.stats.decision import decision_curve, net_benefit
from ml.stats.survival import harrell_c, time_dependent_auc
from ml.stats.threshold import threshold_metrics

TRUTH = "generator truth (best achievable)"


def make_scored(n: int = 300, seed: int = 0, survival: bool = True,
                centres: list[str] | None = None) -> Scored:
    """A logistic outcome with known signal, a model that sees it with noise, two comparators."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    truth = expit(-0.4 + 1.6 * x)
    y = (rng.uniform(size=n) < truth).astype(np.int64)
    prob = expit(-0.4 + 1.6 * (x + rng.normal(scale=0.6, size=n)))
    weak = expit(-0.4 + 0.5 * (x + rng.normal(scale=2.0, size=n)))
    noise = rng.uniform(0.05, 0.95, size=n)
    time = event = risk = None
    if survival:
        event_time = rng.exponential(40.0 * np.exp(-0.8 * x))
        censor = rng.uniform(6.0, 60.0, size=n)
        time, event, risk = np.minimum(event_time, censor), event_time <= censor, prob
    return Scored(
        model_name="synthetic-model 1.0.0", task="crc-liver-metastasis",
        outcome_name="liver metastasis within 3 years",
        patient_ids=[f"P{i:04d}" for i in range(n)],
        centres=centres or [f"C{1 + i % 3}" for i in range(n)],
        y=y, prob=prob, threshold=0.4,
        comparators={"weak clinical": weak, "noise": noise}, tested=["weak clinical", "noise"],
        reference={TRUTH: truth}, time_months=time, event=event, risk_for_survival=risk,
        split={"test_centre": "C1-C3", "train": 900, "val": 200, "test": n, "seed": seed},
        notes=["crops from ground-truth labels"])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scored, dict[str, Any], Path]:
    scored = make_scored()
    out = tmp_path_factory.mktemp("evaluation")
    return scored, evaluate_scored(scored, out), out


# ---------------------------------------------------------------------------------------
# Figures agree with ml.stats
# ---------------------------------------------------------------------------------------


def test_auc_figures_match_ml_stats(evaluated: tuple[Scored, dict[str, Any], Path]) -> None:
    scored, result, _ = evaluated
    y = scored.y
    expected = auc_ci(y, scored.prob)
    got = result["auc"]["model"]
    assert (got["auc"], got["low"], got["high"], got["method"]) == pytest.approx(
        (expected.auc, expected.low, expected.high, "delong"))
    for name, score in scored.comparators.items():
        assert result["auc"]["comparators"][name]["auc"] == pytest.approx(auc_ci(y, score).auc)
    ref = auc_ci(y, scored.reference[TRUTH])
    assert result["auc"]["reference"][TRUTH]["low"] == pytest.approx(ref.low)
    assert result["ratio_to_reference"][TRUTH] == pytest.approx(expected.auc / ref.auc)
    # the planted signal: model well above chance and below the truth, noise near 0.5
    assert 0.7 < expected.auc < ref.auc
    assert abs(result["auc"]["comparators"]["noise"]["auc"] - 0.5) < 0.1


def test_delong_matches_ml_stats(evaluated: tuple[Scored, dict[str, Any], Path]) -> None:
    scored, result, _ = evaluated
    assert set(result["delong"]) == set(scored.tested)
    for name in scored.tested:
        res = delong_test(scored.y, scored.prob, scored.comparators[name])
        got = result["delong"][name]
        assert (got["diff"], got["z"], got["p_value"]) == pytest.approx(
            (res.diff, res.z, res.p_value))
    assert result["delong"]["noise"]["p_value"] < 0.001


def test_threshold_calibration_dca_match_ml_stats(
        evaluated: tuple[Scored, dict[str, Any], Path]) -> None:
    scored, result, _ = evaluated
    tm = threshold_metrics(scored.y, scored.prob, scored.threshold)
    got = result["threshold"]
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tm.tp, tm.fp, tm.tn, tm.fn)
    for key in ("sensitivity", "specificity", "ppv", "npv"):
        p = getattr(tm, key)
        assert (got[key]["estimate"], got[key]["low"], got[key]["high"]) == pytest.approx(
            (p.estimate, p.low, p.high))
    cal = calibration(scored.y, scored.prob)
    c = result["calibration"]["model"]
    assert (c["intercept"], c["slope"], c["brier"]) == pytest.approx(
        (cal.intercept, cal.slope, cal.brier))
    dca = result["decision_curve"]
    assert dca["thresholds"][0] == 0.05 and dca["thresholds"][-1] == 0.6
    curve = decision_curve(scored.y, scored.prob, m.DCA_THRESHOLDS)
    np.testing.assert_allclose(dca["model"], curve.model)
    np.testing.assert_allclose(dca["treat_all"], curve.treat_all)
    assert dca["treat_none"] == [0.0] * len(dca["thresholds"])
    np.testing.assert_allclose(dca["comparators"]["weak clinical"],
                               net_benefit(scored.y, scored.comparators["weak clinical"],
                                           m.DCA_THRESHOLDS))


def test_survival_matches_ml_stats(evaluated: tuple[Scored, dict[str, Any], Path]) -> None:
    scored, result, _ = evaluated
    assert scored.time_months is not None and scored.event is not None
    surv = result["survival"]
    c = harrell_c(scored.time_months, scored.event, scored.prob)
    assert surv["c_index"]["c_index"] == pytest.approx(c.c_index)
    by_month = {h["months"]: h for h in surv["time_dependent_auc"]}
    assert set(by_month) == {12.0, 24.0, 36.0}
    td = time_dependent_auc(scored.time_months, scored.event, scored.prob, [24.0])
    assert by_month[24.0]["estimable"] and by_month[24.0]["auc"] == pytest.approx(td.auc[0])


def test_horizon_past_follow_up_is_not_estimable() -> None:
    scored = make_scored(n=120, seed=4)
    assert scored.time_months is not None
    keep = np.flatnonzero(scored.time_months < 30.0)
    short = replace(scored, patient_ids=[scored.patient_ids[i] for i in keep],
                    centres=[scored.centres[i] for i in keep], y=scored.y[keep],
                    prob=scored.prob[keep], comparators={}, tested=[], reference={},
                    time_months=scored.time_months[keep],
                    event=np.asarray(scored.event)[keep],
                    risk_for_survival=np.asarray(scored.risk_for_survival)[keep])
    surv = m.survival_table(short)
    assert surv is not None
    by_month = {h["months"]: h for h in surv["time_dependent_auc"]}
    assert by_month[12.0]["estimable"]
    assert not by_month[36.0]["estimable"] and "follow-up" in by_month[36.0]["reason"]


def test_bootstrap_option_uses_ml_stats_bootstrap() -> None:
    scored = make_scored(n=150, seed=1, survival=False)
    result = compute_metrics(scored, bootstrap=200, seed=3)
    expected = auc_ci(scored.y, scored.prob, method="bootstrap", n_boot=200, seed=3)
    got = result["auc"]["model"]
    assert got["method"] == "bootstrap" and result["auc_ci_method"] == "bootstrap"
    assert (got["low"], got["high"]) == pytest.approx((expected.low, expected.high))
    assert result["survival"] is None
    with pytest.raises(ConfigError, match="bootstrap"):
        compute_metrics(scored, bootstrap=1)


# ---------------------------------------------------------------------------------------
# Files and report
# ---------------------------------------------------------------------------------------


def test_files_written(evaluated: tuple[Scored, dict[str, Any], Path]) -> None:
    scored, result, out = evaluated
    for name in ("roc.png", "calibration.png", "decision_curve.png"):
        path = out / name
        assert path.stat().st_size > 1000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
            img.verify()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(result["files"]) == {"roc", "calibration", "decision_curve", "metrics", "report"}
    text = (out / "metrics.json").read_text() + (out / "report.md").read_text()
    assert all(pid not in text for pid in scored.patient_ids)


def test_report_content(evaluated: tuple[Scored, dict[str, Any], Path]) -> None:
    scored, result, out = evaluated
    report = (out / "report.md").read_text()
    assert report.startswith("# Evaluation report: synthetic-model 1.0.0")
    assert "liver metastasis within 3 years" in report
    for item in TRIPOD_AI_ITEMS:
        assert f"\n| {item.item} | {item.topic} |" in report, item.item
    for number in ("17", "18a", "19", "25"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {number} |"))
        assert AUTHORS in row
    for name in scored.tested:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | 0."))
        assert row.endswith(f"| {fmt_p(result['delong'][name]['p_value'])} |")
    for link in ("(roc.png)", "(calibration.png)", "(decision_curve.png)"):
        assert link in report
    assert "crops from ground-truth labels" in report and "test_centre" in report
    assert f"{result['ratio_to_reference'][TRUTH]:.3f}" in report


def test_fmt_p() -> None:
    assert fmt_p(0.0004) == "<0.001"
    assert fmt_p(0.0412) == "0.041"
    assert fmt_p(None) == "n/e"


# ---------------------------------------------------------------------------------------
# Per-centre AUC
# ---------------------------------------------------------------------------------------


def test_per_centre_single_class_not_estimable() -> None:
    base = make_scored(n=200, seed=2, survival=False)
    y = np.asarray(base.y).copy()
    centres = [f"C{1 + i % 2}" for i in range(200)]
    # C9: five non-events only; C8: one event among five cases
    y[:5], y[5:10] = 0, [1, 0, 0, 0, 0]
    centres[:5], centres[5:10] = ["C9"] * 5, ["C8"] * 5
    scored = replace(base, y=y, centres=centres)
    rows = {row["centre"]: row for row in m.per_centre(scored, m.AucSettings())}
    assert not rows["C9"]["estimable"] and "one class" in rows["C9"]["reason"]
    assert (rows["C9"]["n"], rows["C9"]["events"]) == (5, 0)
    assert not rows["C8"]["estimable"] and "2 events" in rows["C8"]["reason"]
    mask = np.asarray(centres) == "C1"
    assert rows["C1"]["auc"] == pytest.approx(auc_ci(y[mask], np.asarray(base.prob)[mask]).auc)
    assert rows["C1"]["n"] == int(mask.sum())


# ---------------------------------------------------------------------------------------
# Scored validation
# ---------------------------------------------------------------------------------------


def _bad(**changes: Any) -> dict[str, Any]:
    return changes


@pytest.mark.parametrize(("changes", "match"), [
    (_bad(prob=np.full(299, 0.5)), "prob has shape"),
    (_bad(patient_ids=["a"]), "patient_ids"),
    (_bad(centres=["C1"] * 10), "centres"),
    (_bad(y=np.r_[np.zeros(150), np.full(150, 2)]), "other than 0/1"),
    (_bad(y=np.zeros(300)), "both classes"),
    (_bad(prob=np.linspace(0.0, 1.2, 300)), "outside"),
    (_bad(prob=np.r_[np.nan, np.full(299, 0.5)]), "non-finite"),
    (_bad(threshold=0.0), "threshold"),
    (_bad(threshold=1.5), "threshold"),
    (_bad(comparators={"short": np.full(10, 0.5)}, tested=[]), "comparator 'short'"),
    (_bad(reference={TRUTH: np.full(300, -0.1)}), "reference"),
    (_bad(tested=["weak clinical", "TNM stage only"]), "TNM stage only"),
    (_bad(event=None), "partial"),
    (_bad(time_months=np.full(300, -1.0)), "negative"),
])
def test_scored_validation(changes: dict[str, Any], match: str) -> None:
    base = make_scored()
    with pytest.raises(ScoredError, match=match):
        replace(base, **changes)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _package(root: Path, task: str) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text(json.dumps({"task": task}))
    return root


def _parse(argv: list[str]) -> argparse.Namespace:
    top = argparse.ArgumentParser(prog="oncopacs")
    cli.register(top.add_subparsers(dest="command", required=True))
    return top.parse_args(["evaluate", *argv])


def test_cli_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "cohort" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}")
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="does not exist"):
        cli.run(_parse(["--model", str(tmp_path / "nope"), "--manifest", str(manifest),
                        "--out", out]))
    with pytest.raises(ConfigError, match=r"metadata\.json is missing"):
        (tmp_path / "empty").mkdir()
        cli.run(_parse(["--model", str(tmp_path / "empty"), "--manifest", str(manifest),
                        "--out", out]))
    odd = _package(tmp_path / "odd", "lung-nodule")
    with pytest.raises(ConfigError, match="unknown task 'lung-nodule'"):
        cli.run(_parse(["--model", str(odd), "--manifest", str(manifest), "--out", out]))
    tsr = _package(tmp_path / "tsr", "pdac-tsr")
    with pytest.raises(ConfigError, match=r"manifest .* does not exist"):
        cli.run(_parse(["--model", str(tsr), "--manifest", str(tmp_path / "none.json"),
                        "--out", out]))
    with pytest.raises(ConfigError, match="bootstrap"):
        cli.run(_parse(["--model", str(tsr), "--manifest", str(manifest), "--out", out,
                        "--bootstrap", "1"]))
    with pytest.raises(ConfigError, match=r"segmentation package folder .*nope-seg"):
        cli.run(_parse(["--model", str(tsr), "--manifest", str(manifest), "--out", out,
                        "--segmentation", str(tmp_path / "nope-seg")]))


def test_cli_scorer_import_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.SCORERS, "pdac-tsr", ("ml.no_such_module", "score_tsr"))
    with pytest.raises(ConfigError, match="cannot be imported"):
        cli.scorer("pdac-tsr")
    with pytest.raises(ConfigError, match="unknown task"):
        cli.scorer("lung-nodule")


def test_cli_end_to_end_with_a_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[dict[str, Any]] = []

    def score(package: Path, manifest: Path, **kwargs: Any) -> Any:
        calls.append({"package": package, "manifest": manifest, **kwargs})
        return make_scored(n=120, seed=5, survival=False) if package.name == "good" else 42

    module = types.ModuleType("fake_scorer")
    module.score = score  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_scorer", module)
    monkeypatch.setitem(cli.SCORERS, "crc-liver-metastasis", ("fake_scorer", "score"))
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "manifest.json").write_text("{}")
    good = _package(tmp_path / "good", "crc-liver-metastasis")
    args = _parse(["--model", str(good), "--manifest", str(cohort), "--out",
                   str(tmp_path / "out"), "--test-centre", "C3", "--threads", "1"])
    assert args.run(args) == 0
    assert calls[0] == {"package": good, "manifest": cohort / "manifest.json",
                        "test_centre": "C3", "device": "cpu", "threads": 1,
                        "segmentation": None}
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert printed["auc"]["auc"] == written["auc"]["model"]["auc"]
    assert printed["delong_p"] == {k: v["p_value"] for k, v in written["delong"].items()}
    assert printed["ratio_to_reference"] == written["ratio_to_reference"]
    assert Path(printed["files"]["report"]).is_file()
    bad = _package(tmp_path / "bad", "crc-liver-metastasis")
    with pytest.raises(ConfigError, match="not a Scored"):
        cli.run(_parse(["--model", str(bad), "--manifest", str(cohort), "--out",
                        str(tmp_path / "out2")]))
