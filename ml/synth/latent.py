"""The latent model of the synthetic cohort.

Every patient is drawn from one seeded generator per (cohort seed, patient
index), so a patient is the same whatever the cohort size or worker count.

CRC (stage I-III, after curative resection): the log-odds of liver metastasis
within 3 years is

    logit = B0 + B_STAGE * stage_z + B_CEA * cea_z + B_IMAGE * z_ct + B_IMAGE * z_wsi

where ``stage_z`` is the standardised TNM stage score, ``cea_z`` the
standardised log serum CEA, and ``z_ct`` / ``z_wsi`` standard normal latents
that only the images show (liver texture heterogeneity and micro-foci on CT,
the stroma fraction of the tumour on the H&E slide). The outcome is drawn from
that probability, so the best achievable AUC is the AUC of the probability
itself (about 0.88); TNM alone reaches about 0.66, CEA alone about 0.64.

PDAC (pre-operative): a latent stroma score ``s`` ~ N(0, 1) sets the true
tumour-stroma ratio ``sigmoid(s)``; "high" TSR is ratio >= 0.5 (``s >= 0``).
Each CT phase shows ``s`` with independent noise (``a = s + e_a``,
``v = s + e_v``, sd ``PHASE_NOISE``) as the tumour's enhancement, so the best
achievable AUC is that of P(high | a, v) (about 0.91) and a single phase
reaches about 0.85.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import norm

from ml.errors import SynthError
from ml.synth.centres import Centre

B0 = -1.7
B_STAGE = 0.85
B_CEA = 0.75
B_IMAGE = 1.3
STAGE_SCORE_MEAN = 1.29
STAGE_SCORE_SD = 0.94
LOG_CEA_MEAN = math.log(2.5)
LOG_CEA_SD = 0.8
PHASE_NOISE = 0.9
FOLLOW_UP_MONTHS = 36.0
BASE_DATE = dt.date(2024, 1, 8)

Group = Literal["CRC", "PDAC"]


@dataclass(frozen=True)
class CrcLatent:
    """What the generator knows of a colorectal cancer patient."""

    t_stage: int
    n_stage: int
    stage_group: str
    site: str
    cea_ug_l: float
    ca19_9_u_ml: float
    z_ct: float
    z_wsi: float
    logit: float
    probability: float
    met_3y: bool
    time_to_event_months: float | None
    observed_months: float
    event_observed: bool
    tumour_radius_mm: float
    liver_texture_hu: float
    liver_foci: int
    stroma_fraction: float


@dataclass(frozen=True)
class PdacLatent:
    """What the generator knows of a pancreatic cancer patient."""

    site: str
    s: float
    tsr: float
    tsr_high: bool
    f_arterial: float
    f_venous: float
    probability: float
    probability_arterial: float
    probability_venous: float
    cea_ug_l: float
    ca19_9_u_ml: float
    tumour_radius_mm: float
    tumour_hu_arterial: float
    tumour_hu_venous: float


@dataclass(frozen=True)
class PatientSpec:
    """One synthetic patient: identity, dates, centre and latent features."""

    index: int
    group: Group
    patient_id: str
    issuer: str
    name: str
    sex: str
    birth_date: dt.date
    age_years: int
    centre: Centre
    ct_date: dt.date
    lab_date: dt.date
    surgery_date: dt.date
    latent: CrcLatent | PdacLatent

    @property
    def crc(self) -> CrcLatent:
        """The CRC latent; only for CRC patients."""
        if not isinstance(self.latent, CrcLatent):
            raise SynthError(f"patient {self.patient_id} is not a CRC patient")
        return self.latent

    @property
    def pdac(self) -> PdacLatent:
        """The PDAC latent; only for PDAC patients."""
        if not isinstance(self.latent, PdacLatent):
            raise SynthError(f"patient {self.patient_id} is not a PDAC patient")
        return self.latent

    def labels(self) -> dict[str, Any]:
        """The outcome, centre and true probability, as written to the manifest."""
        out: dict[str, Any] = {"group": self.group, "centre": self.centre.code}
        out.update(asdict(self.latent))
        return out


def patient_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """An independent generator for one patient and one purpose (``latent``, ``ct``, ``wsi``)."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(np.random.SeedSequence([seed, index, tag]))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def stage_score(t_stage: int, n_stage: int) -> float:
    """TNM stage score: group I=0, II=1, III=2, plus 0.5 for T4 and 0.5 for N2."""
    group = 2 if n_stage > 0 else (1 if t_stage >= 3 else 0)
    return group + 0.5 * (t_stage == 4) + 0.5 * (n_stage == 2)


def stage_group(t_stage: int, n_stage: int) -> str:
    """AJCC stage group (I, II, III) of a non-metastatic colorectal cancer."""
    if n_stage > 0:
        return "III"
    return "II" if t_stage >= 3 else "I"


def _crc_tnm(rng: np.random.Generator, centre: Centre) -> tuple[int, int]:
    stage_iii = rng.random() < centre.stage_iii_share
    if stage_iii:
        t = int(rng.choice([1, 2, 3, 4], p=[0.05, 0.15, 0.6, 0.2]))
        n = 2 if rng.random() < 0.35 else 1
        return t, n
    if rng.random() < 0.42:
        return int(rng.choice([1, 2], p=[0.4, 0.6])), 0
    return (4 if rng.random() < 0.2 else 3), 0


def crc_logit(t_stage: int, n_stage: int, cea_ug_l: float, z_ct: float, z_wsi: float) -> float:
    """Log-odds of liver metastasis within 3 years (the generator's truth)."""
    stage_z = (stage_score(t_stage, n_stage) - STAGE_SCORE_MEAN) / STAGE_SCORE_SD
    cea_z = (math.log(cea_ug_l) - LOG_CEA_MEAN) / LOG_CEA_SD
    return B0 + B_STAGE * stage_z + B_CEA * cea_z + B_IMAGE * (z_ct + z_wsi)


def sample_crc(rng: np.random.Generator, centre: Centre) -> CrcLatent:
    """Draw one CRC patient's latent features, outcome and follow-up."""
    t, n = _crc_tnm(rng, centre)
    stage_z = (stage_score(t, n) - STAGE_SCORE_MEAN) / STAGE_SCORE_SD
    cea = math.exp(LOG_CEA_MEAN + LOG_CEA_SD * (0.12 * stage_z + float(rng.normal())))
    ca19_9 = math.exp(math.log(12.0) + 0.7 * float(rng.normal()))
    z_ct, z_wsi = float(rng.normal()), float(rng.normal())
    logit = crc_logit(t, n, cea, z_ct, z_wsi)
    p = _sigmoid(logit)
    met = bool(rng.random() < p)
    tte = float(rng.uniform(3.0, FOLLOW_UP_MONTHS)) if met else None
    dropout = float(rng.exponential(120.0))
    end = tte if tte is not None else FOLLOW_UP_MONTHS
    observed = min(end, dropout)
    return CrcLatent(
        t_stage=t, n_stage=n, stage_group=stage_group(t, n),
        site=str(rng.choice(["right colon", "left colon", "rectum"], p=[0.4, 0.35, 0.25])),
        cea_ug_l=round(cea, 2), ca19_9_u_ml=round(ca19_9, 1), z_ct=z_ct, z_wsi=z_wsi,
        logit=logit, probability=p, met_3y=met, time_to_event_months=tte,
        observed_months=round(observed, 2), event_observed=bool(met and tte is not None
                                                                and tte <= dropout),
        tumour_radius_mm=8.0 + 3.0 * t + float(rng.uniform(-2.0, 2.0)),
        liver_texture_hu=float(np.clip(12.0 + 5.0 * z_ct, 2.0, 26.0)),
        liver_foci=int(rng.poisson(2.0 * math.exp(0.6 * z_ct))),
        stroma_fraction=0.2 + 0.6 * _sigmoid(1.5 * z_wsi),
    )


def pdac_probabilities(f_arterial: float, f_venous: float) -> tuple[float, float, float]:
    """P(high TSR | phase evidence) for both phases, arterial only and venous only."""
    def posterior(evidence: list[float]) -> float:
        precision = 1.0 + len(evidence) / PHASE_NOISE**2
        mean = sum(evidence) / PHASE_NOISE**2 / precision
        return float(norm.cdf(mean * math.sqrt(precision)))

    return (posterior([f_arterial, f_venous]), posterior([f_arterial]),
            posterior([f_venous]))


def sample_pdac(rng: np.random.Generator) -> PdacLatent:
    """Draw one PDAC patient's stroma latent and its phase evidence."""
    s = float(rng.normal())
    f_a = s + PHASE_NOISE * float(rng.normal())
    f_v = s + PHASE_NOISE * float(rng.normal())
    p, p_a, p_v = pdac_probabilities(f_a, f_v)
    return PdacLatent(
        site=str(rng.choice(["head", "body", "tail"], p=[0.65, 0.2, 0.15])),
        s=s, tsr=_sigmoid(s), tsr_high=s >= 0.0, f_arterial=f_a, f_venous=f_v,
        probability=p, probability_arterial=p_a, probability_venous=p_v,
        cea_ug_l=round(math.exp(math.log(3.5) + 0.8 * float(rng.normal())), 2),
        ca19_9_u_ml=round(math.exp(math.log(180.0) + 1.2 * float(rng.normal())), 1),
        tumour_radius_mm=float(rng.uniform(11.0, 18.0)),
        # High stroma: hypo-enhancing in the arterial phase, less washout in venous.
        tumour_hu_arterial=85.0 - 18.0 * f_a,
        tumour_hu_venous=75.0 + 14.0 * f_v,
    )


def sample_patient(seed: int, index: int, centres: tuple[Centre, ...]) -> PatientSpec:
    """The patient at ``index`` of the cohort drawn with ``seed``.

    Even indices are CRC and odd indices PDAC; centres take turns, so that even
    a tiny cohort has both groups and every centre.
    """
    rng = patient_rng(seed, index, "latent")
    group: Group = "CRC" if index % 2 == 0 else "PDAC"
    centre = centres[(index // 2) % len(centres)]
    sex = "M" if rng.random() < (0.55 if group == "CRC" else 0.52) else "F"
    age = int(np.clip(rng.normal(67.0, 10.0), 35, 90))
    surgery = BASE_DATE + dt.timedelta(days=int(rng.integers(0, 700)))
    ct_date = surgery - dt.timedelta(days=int(rng.integers(7, 29)))
    lab_date = surgery - dt.timedelta(days=int(rng.integers(1, 15)))
    birth = surgery - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    latent: CrcLatent | PdacLatent = (
        sample_crc(rng, centre) if group == "CRC" else sample_pdac(rng)
    )
    return PatientSpec(
        index=index, group=group, patient_id=f"SYN{seed % 10000:04d}-{index:05d}",
        issuer=f"OncopacsSynth{centre.code}", name=f"SYNTHETIC^{group}{index:05d}",
        sex=sex, birth_date=birth, age_years=age, centre=centre, ct_date=ct_date,
        lab_date=lab_date, surgery_date=surgery, latent=latent,
    )
