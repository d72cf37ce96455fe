"""Evaluation statistics for the oncopacs models (issue 5: validation against TNM and CEA).

Plain modules (no MONAI Deploy import); each takes numpy arrays of outcomes and
scores and returns a frozen dataclass:

- ``auc``: ROC AUC with a DeLong (Sun & Xu 2014 midrank algorithm) or stratified
  bootstrap 95% CI, and the DeLong test of two correlated AUCs on the same cases;
- ``threshold``: sensitivity, specificity, PPV and NPV at a pre-fixed threshold
  with Wilson or Clopper-Pearson CIs, and thresholds chosen on training data;
- ``calibration``: calibration-in-the-large, calibration slope, Brier score and a
  binned reliability curve;
- ``decision``: decision-curve analysis (net benefit of the model, treat-all,
  treat-none);
- ``survival``: Harrell's C-index and cumulative/dynamic time-dependent AUC
  (scikit-survival);
- ``plots``: ROC, calibration and decision-curve figures as PNG files
  (matplotlib, Agg canvas).

Conventions: outcomes are 0/1 with 1 the event (e.g. metachronous liver
metastasis); a higher score means a higher risk of the event.
"""
