"""Clinical fields of model A and their encoding as a fixed-length vector with missing masks.

The vector holds standardised values (training means and SDs from
:class:`ml.crc.config.ClinicalStats`; a missing value is set to the training mean,
i.e. 0) followed by one indicator per field group that is 1 when the group is
missing, so the network tells an imputed value from a measured one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml.crc.config import ClinicalStats, CrcError

SITES: tuple[str, ...] = ("right colon", "left colon", "rectum")
FIELDS: tuple[str, ...] = ("tnm", "cea", "ca19_9", "age", "sex", "site")
"""Names of the clinical field groups, as reported in ``inputs_used`` / ``inputs_missing``."""
VALUES = 9  # t, n, log CEA, log CA19-9, age, sex, three site indicators
WIDTH = VALUES + len(FIELDS)


@dataclass(frozen=True)
class CrcClinical:
    """Pre-operative clinical fields; every field may be missing (None).

    Attributes
    ----------
    t_stage
        pT 1-4.
    n_stage
        pN 0-2.
    cea_ug_l
        Serum CEA in ug/L.
    ca19_9_u_ml
        Serum CA19-9 in U/mL.
    age_years
        Age at surgery.
    sex
        ``"M"`` or ``"F"``.
    site
        ``"right colon"``, ``"left colon"`` or ``"rectum"``.
    """

    t_stage: int | None = None
    n_stage: int | None = None
    cea_ug_l: float | None = None
    ca19_9_u_ml: float | None = None
    age_years: int | None = None
    sex: str | None = None
    site: str | None = None

    def __post_init__(self) -> None:
        if self.t_stage is not None and self.t_stage not in (1, 2, 3, 4):
            raise CrcError(f"clinical t_stage must be 1-4, got {self.t_stage!r}")
        if self.n_stage is not None and self.n_stage not in (0, 1, 2):
            raise CrcError(f"clinical n_stage must be 0-2, got {self.n_stage!r}")
        for name in ("cea_ug_l", "ca19_9_u_ml"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0.0):
                raise CrcError(f"clinical {name} must be a finite value >= 0, got {value!r}")
        if self.age_years is not None and not 0 <= self.age_years <= 130:
            raise CrcError(f"clinical age_years must be 0-130, got {self.age_years!r}")
        if self.sex is not None and self.sex not in ("M", "F"):
            raise CrcError(f"clinical sex must be 'M' or 'F', got {self.sex!r}")
        if self.site is not None and self.site not in SITES:
            raise CrcError(f"clinical site must be one of {SITES}, got {self.site!r}")

    def present(self) -> dict[str, bool]:
        """Which field groups are given (``tnm`` needs both T and N)."""
        return {"tnm": self.t_stage is not None and self.n_stage is not None,
                "cea": self.cea_ug_l is not None, "ca19_9": self.ca19_9_u_ml is not None,
                "age": self.age_years is not None, "sex": self.sex is not None,
                "site": self.site is not None}

    @classmethod
    def from_labels(cls, labels: dict[str, Any], age_years: int | None,
                    sex: str | None) -> CrcClinical:
        """The fields of a cohort manifest entry (its ``labels`` plus age and sex)."""
        def num(key: str) -> float | None:
            value = labels.get(key)
            return None if value is None else float(value)

        t, n = labels.get("t_stage"), labels.get("n_stage")
        return cls(t_stage=None if t is None else int(t), n_stage=None if n is None else int(n),
                   cea_ug_l=num("cea_ug_l"), ca19_9_u_ml=num("ca19_9_u_ml"),
                   age_years=age_years, sex=sex, site=labels.get("site"))


def _log_z(value: float | None, mean: float, sd: float) -> float:
    return 0.0 if value is None else (math.log(max(value, 1e-3)) - mean) / sd


def clinical_vector(clinical: CrcClinical, stats: ClinicalStats) -> np.ndarray:
    """Encode ``clinical`` as a ``(WIDTH,)`` float32 vector (values, then missing flags)."""
    t, n = clinical.t_stage, clinical.n_stage
    values = [
        0.0 if t is None else (t - stats.t_mean) / stats.t_sd,
        0.0 if n is None else (n - stats.n_mean) / stats.n_sd,
        _log_z(clinical.cea_ug_l, stats.log_cea_mean, stats.log_cea_sd),
        _log_z(clinical.ca19_9_u_ml, stats.log_ca19_9_mean, stats.log_ca19_9_sd),
        0.0 if clinical.age_years is None else (clinical.age_years - stats.age_mean) / stats.age_sd,
        0.0 if clinical.sex is None else (1.0 if clinical.sex == "M" else -1.0),
    ]
    values += [float(clinical.site == s) for s in SITES]
    present = clinical.present()
    present["tnm"] = t is not None or n is not None  # a single stage still counts as data
    flags = [0.0 if present[name] else 1.0 for name in FIELDS]
    return np.asarray(values + flags, dtype=np.float32)


def fit_stats(records: list[CrcClinical]) -> ClinicalStats:
    """Means and SDs of the given (training) patients; missing values are skipped.

    Raises
    ------
    CrcError
        If a field has fewer than two values.
    """
    def mean_sd(values: list[float], name: str) -> tuple[float, float]:
        if len(values) < 2:
            raise CrcError(f"clinical field {name} has {len(values)} values in the training "
                           "split; at least 2 are needed to standardise it")
        arr = np.asarray(values, dtype=np.float64)
        return float(arr.mean()), max(float(arr.std()), 1e-3)

    t = mean_sd([float(r.t_stage) for r in records if r.t_stage is not None], "t_stage")
    n = mean_sd([float(r.n_stage) for r in records if r.n_stage is not None], "n_stage")
    cea = mean_sd([math.log(max(r.cea_ug_l, 1e-3)) for r in records if r.cea_ug_l is not None],
                  "cea_ug_l")
    ca = mean_sd([math.log(max(r.ca19_9_u_ml, 1e-3)) for r in records
                  if r.ca19_9_u_ml is not None], "ca19_9_u_ml")
    age = mean_sd([float(r.age_years) for r in records if r.age_years is not None], "age_years")
    return ClinicalStats(t_mean=t[0], t_sd=t[1], n_mean=n[0], n_sd=n[1], log_cea_mean=cea[0],
                         log_cea_sd=cea[1], log_ca19_9_mean=ca[0], log_ca19_9_sd=ca[1],
                         age_mean=age[0], age_sd=age[1])
