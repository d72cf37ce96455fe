"""The Markdown evaluation report written next to ``metrics.json``.

The report is rendered from the metrics dict of
:func:`ml.evaluate.run.compute_metrics` only, so every number in it is the one
in ``metrics.json``. Sections are numbered (§1-§12); the TRIPOD+AI checklist
in §12 refers to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml.evaluate.tripod import checklist_markdown

DCA_REPORTED = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
"""Threshold probabilities tabulated in the report (the figure has the full grid)."""


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``"n/e"`` (not estimable) for ``None``."""
    return "n/e" if value is None else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value as written in the report: ``<0.001`` or three decimals."""
    if p is None:
        return "n/e"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def cell(text: object) -> str:
    """``text`` made safe for a Markdown table cell (no pipes or line breaks)."""
    return str(text).replace("|", "/").replace("\n", " ")


_METHOD_NAMES = {"delong": "DeLong", "bootstrap": "bootstrap", "wilson": "Wilson",
                 "exact": "Clopper-Pearson"}


def _ci(d: Mapping[str, Any], key: str = "auc", low: str = "low", high: str = "high") -> str:
    return f"{fmt(d.get(key))} ({fmt(d.get(low))} to {fmt(d.get(high))})"


def _summary(r: Mapping[str, Any]) -> list[str]:
    model = r["auc"]["model"]
    return ["## 1. Summary", "",
            f"- Model: **{cell(r['model'])}** (task `{r['task']}`), applied unchanged to "
            "held-out data",
            f"- Outcome: {r['outcome']}",
            f"- Cases: {r['n']}, events: {r['events']} (prevalence {r['prevalence']:.3f}); "
            f"centres: {', '.join(r['centres'])}",
            f"- AUC {_ci(model)} (95% CI, {_METHOD_NAMES[r['auc_ci_method']]})", ""]


def _split(r: Mapping[str, Any]) -> list[str]:
    lines = ["## 2. Data and split", "", "| Item | Value |", "|---|---|"]
    for key, value in r["split"].items():
        lines.append(f"| {cell(key)} | {cell(value)} |")
    lines += ["", "Every case listed here has a model output; the tables below use all of them.",
              ""]
    return lines


def _notes(r: Mapping[str, Any]) -> list[str]:
    body = [f"- {cell(note)}" for note in r["notes"]] or ["- none"]
    return ["## 3. Notes", "", *body, ""]


def _discrimination(r: Mapping[str, Any]) -> list[str]:
    aucs, ratios = r["auc"], r["ratio_to_reference"]
    lines = ["## 4. Discrimination", "",
             f"AUC with 95% CI ({_METHOD_NAMES[r['auc_ci_method']]}).", "",
             "| Score | Kind | AUC (95% CI) |", "|---|---|---|",
             f"| {cell(r['model'])} | model | {_ci(aucs['model'])} |"]
    for kind, label in (("comparators", "comparator"), ("reference", "reference")):
        for name, d in aucs[kind].items():
            lines.append(f"| {cell(name)} | {label} | {_ci(d)} |")
    if ratios:
        lines += ["", "| Model AUC / reference AUC | Ratio |", "|---|---|"]
        lines += [f"| {cell(name)} | {fmt(v)} |" for name, v in ratios.items()]
    return [*lines, ""]


def _delong(r: Mapping[str, Any]) -> list[str]:
    lines = ["## 5. Comparison with comparators (DeLong test)", ""]
    if not r["delong"]:
        return [*lines, "No comparator was named for testing.", ""]
    lines += ["| Comparator | AUC model | AUC comparator | Difference (95% CI) | z | p |",
              "|---|---|---|---|---|---|"]
    for name, d in r["delong"].items():
        lines.append(f"| {cell(name)} | {fmt(d['auc_model'])} | {fmt(d['auc_comparator'])} | "
                     f"{_ci(d, 'diff', 'diff_low', 'diff_high')} | {fmt(d['z'], 2)} | "
                     f"{fmt_p(d['p_value'])} |")
    return [*lines, ""]


def _centres(r: Mapping[str, Any]) -> list[str]:
    lines = ["## 6. Performance by centre", "", "| Centre | Cases | Events | AUC (95% CI) |",
             "|---|---|---|---|"]
    for row in r["per_centre"]:
        auc = _ci(row) if row["estimable"] else f"not estimable: {cell(row['reason'])}"
        lines.append(f"| {cell(row['centre'])} | {row['n']} | {row['events']} | {auc} |")
    return [*lines, ""]


def _threshold(r: Mapping[str, Any]) -> list[str]:
    t = r["threshold"]
    lines = ["## 7. Classification at the pre-fixed threshold", "",
             f"Positive when the model's probability >= {t['threshold']:.4g} (fixed on "
             f"training data). TP {t['tp']}, FP {t['fp']}, TN {t['tn']}, FN {t['fn']}.", "",
             f"| Measure | Estimate ({_METHOD_NAMES[t['ci_method']]} 95% CI) | Count |",
             "|---|---|---|"]
    for key in ("sensitivity", "specificity", "ppv", "npv"):
        p = t[key]
        lines.append(f"| {key.upper() if len(key) == 3 else key} | "
                     f"{_ci(p, 'estimate')} | {p['count']}/{p['total']} |")
    return [*lines, ""]


def _calibration_row(name: str, c: Mapping[str, Any]) -> str:
    if not c["estimable"]:
        return f"| {cell(name)} | not estimable: {cell(c['reason'])} | | |"
    return (f"| {cell(name)} | {_ci(c, 'intercept', 'intercept_low', 'intercept_high')} | "
            f"{_ci(c, 'slope', 'slope_low', 'slope_high')} | {fmt(c['brier'])} |")


def _calibration(r: Mapping[str, Any]) -> list[str]:
    cal = r["calibration"]
    lines = ["## 8. Calibration and clinical utility", "",
             "| Probabilities | Intercept (95% CI) | Slope (95% CI) | Brier |",
             "|---|---|---|---|", _calibration_row(r["model"], cal["model"])]
    for kind in ("comparators", "reference"):
        lines += [_calibration_row(name, c) for name, c in cal[kind].items()]
    dca = r["decision_curve"]
    idx = [dca["thresholds"].index(t) for t in DCA_REPORTED if t in dca["thresholds"]]
    rows = {"treat all": dca["treat_all"], r["model"]: dca["model"],
            **dca["comparators"], **dca["reference"]}
    lines += ["", "Net benefit by threshold probability (decision curve, "
              f"{dca['thresholds'][0]:.2f}-{dca['thresholds'][-1]:.2f}; treat none = 0):", "",
              "| Strategy | " + " | ".join(f"{dca['thresholds'][i]:.2f}" for i in idx) + " |",
              "|---|" + "---|" * len(idx)]
    for name, values in rows.items():
        lines.append(f"| {cell(name)} | " + " | ".join(fmt(values[i]) for i in idx) + " |")
    return [*lines, ""]


def _survival(r: Mapping[str, Any]) -> list[str]:
    s = r["survival"]
    lines = ["## 9. Time to event", ""]
    if s is None:
        return [*lines, "Not applicable: no follow-up times were given.", ""]
    c = s["c_index"]
    c_text = fmt(c["c_index"]) if c["estimable"] else f"not estimable: {c['reason']}"
    lines += [f"Cases {s['n']}, events {s['events']}, median follow-up "
              f"{fmt(s['median_follow_up_months'], 1)} months.", "",
              f"- Harrell's C-index of the survival risk score: {c_text}"]
    for h in s["time_dependent_auc"]:
        text = fmt(h["auc"]) if h["estimable"] else f"not estimable: {h['reason']}"
        lines.append(f"- Time-dependent AUC at {h['months']:.0f} months: {text}")
    return [*lines, ""]


def _methods(r: Mapping[str, Any]) -> list[str]:
    auc_text = (f"stratified bootstrap percentile intervals ({r['bootstrap_resamples']} "
                f"resamples, seed {r['seed']})" if r["auc_ci_method"] == "bootstrap"
                else "DeLong standard errors")
    return ["## 10. Methods", "",
            f"The model and its decision threshold are applied unchanged (no recalibration or "
            f"other updating). AUC 95% CIs use {auc_text}; the model is compared with each "
            "tested comparator by the DeLong test of correlated AUCs (two-sided). Per-centre "
            "AUCs use the same method; centres with one class are not estimable. Sensitivity, "
            "specificity, PPV and NPV have Wilson 95% CIs. Calibration intercept "
            "(calibration-in-the-large, logit offset) and slope (logistic recalibration) have "
            "Wald CIs; the Brier score is the mean squared error of the probabilities. "
            "Decision curves give the net benefit TP/n - FP/n * pt/(1 - pt). For time-to-event "
            "outcomes Harrell's C and the cumulative/dynamic time-dependent AUC (Uno) are "
            "reported. Computed with oncopacs ml/stats.", ""]


def _figures(figures: Mapping[str, str]) -> list[str]:
    lines = ["## 11. Figures", ""]
    for key, title in (("roc", "ROC curves"), ("calibration", "Calibration"),
                       ("decision_curve", "Decision curve")):
        if key in figures:
            lines += [f"![{title}]({figures[key]})", ""]
        else:
            lines += [f"{title}: not drawn (no estimable curve).", ""]
    return lines


def render_report(result: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """Return the Markdown report of an evaluation.

    Parameters
    ----------
    result : mapping
        Metrics from :func:`ml.evaluate.run.compute_metrics`.
    figures : mapping of str to str
        Figure key (``roc``, ``calibration``, ``decision_curve``) to the file name,
        relative to the report.

    Returns
    -------
    str
        The report text.
    """
    lines = [f"# Evaluation report: {result['model']}", "",
             f"Outcome: {result['outcome']}. Generated by `oncopacs evaluate`.", ""]
    for part in (_summary(result), _split(result), _notes(result), _discrimination(result),
                 _delong(result), _centres(result), _threshold(result),
                 _calibration(result), _survival(result), _methods(result),
                 _figures(figures)):
        lines += part
    lines += ["## 12. TRIPOD+AI checklist (items software can fill)", "",
              "Items of TRIPOD+AI (Collins et al., BMJ 2024;385:e078378), shortened. "
              "'partly' and 'to be completed by the authors' items need the manuscript.", "",
              *checklist_markdown(), ""]
    return "\n".join(lines)


def write_report(result: Mapping[str, Any], path: Path, *, figures: Mapping[str, str]) -> Path:
    """Write :func:`render_report` to ``path`` (UTF-8) and return ``path``."""
    path.write_text(render_report(result, figures), encoding="utf-8")
    return path
