"""The planted signal: the latent model reaches the AUCs the README documents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ml.errors import SynthError
from ml.synth.centres import centres
from ml.synth.latent import sample_patient, stage_score

N_PATIENTS = 8000  # 4000 per group: AUC standard error about 0.01


@pytest.fixture(scope="module")
def cohort() -> list:
    return [sample_patient(11, i, centres(3)) for i in range(N_PATIENTS)]


def _split_auc(features: np.ndarray, y: np.ndarray) -> float:
    """Fit a logistic regression on the first half, return its AUC on the second."""
    half = len(y) // 2
    model = LogisticRegression(max_iter=1000).fit(features[:half], y[:half])
    return float(roc_auc_score(y[half:], model.predict_proba(features[half:])[:, 1]))


def test_crc_best_tnm_and_cea_aucs(cohort: list) -> None:
    crc = [p.crc for p in cohort if p.group == "CRC"]
    y = np.array([c.met_3y for c in crc])
    stage = np.array([[stage_score(c.t_stage, c.n_stage)] for c in crc])
    cea = np.array([[math.log(c.cea_ug_l)] for c in crc])
    images = np.array([[c.z_ct, c.z_wsi] for c in crc])
    half = len(y) // 2
    best = roc_auc_score(y[half:], [c.probability for c in crc[half:]])
    full = _split_auc(np.hstack([stage, cea, images]), y)
    tnm = _split_auc(stage, y)
    cea_only = _split_auc(cea, y)
    assert 0.85 <= best <= 0.91
    assert abs(full - best) < 0.02, (full, best)
    assert 0.60 <= tnm <= 0.72, tnm
    assert 0.60 <= cea_only <= 0.72, cea_only
    assert 0.2 <= y.mean() <= 0.35


def test_crc_censoring_is_consistent(cohort: list) -> None:
    for c in (p.crc for p in cohort if p.group == "CRC"):
        assert 0 < c.observed_months <= 36.0
        if c.event_observed:
            assert c.met_3y and c.time_to_event_months == pytest.approx(c.observed_months,
                                                                        abs=0.01)
        if not c.met_3y:
            assert c.time_to_event_months is None and not c.event_observed
        assert c.stage_group in {"I", "II", "III"}


def test_pdac_dual_phase_beats_single_phase(cohort: list) -> None:
    pdac = [p.pdac for p in cohort if p.group == "PDAC"]
    y = np.array([d.tsr_high for d in pdac])
    both = _split_auc(np.array([[d.f_arterial, d.f_venous] for d in pdac]), y)
    arterial = _split_auc(np.array([[d.f_arterial] for d in pdac]), y)
    venous = _split_auc(np.array([[d.f_venous] for d in pdac]), y)
    assert 0.87 <= both <= 0.94, both
    assert both > arterial + 0.03 and both > venous + 0.03, (both, arterial, venous)
    assert all((d.tsr >= 0.5) == d.tsr_high for d in pdac)


def test_patient_is_independent_of_cohort_size() -> None:
    assert sample_patient(5, 17, centres(3)) == sample_patient(5, 17, centres(3))
    assert sample_patient(5, 17, centres(3)) != sample_patient(6, 17, centres(3))


def test_groups_and_centres_take_turns(cohort: list) -> None:
    first = cohort[:12]
    assert [p.group for p in first[:4]] == ["CRC", "PDAC", "CRC", "PDAC"]
    assert {p.centre.code for p in first} == {"C1", "C2", "C3"}
    assert all(p.lab_date < p.surgery_date and p.ct_date < p.surgery_date for p in cohort)


def test_centre_count_is_checked() -> None:
    with pytest.raises(SynthError, match="--centers must be between 1 and 6, got 9"):
        centres(9)
