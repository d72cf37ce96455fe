"""Model inputs from what the service holds: the clinical store's fields as model A's
clinical record.

TNM categories arrive as AJCC codes (``pT3``, ``ypN1a``, ``T4b``); the primary site as
text (``right colon``) or an ICD-O-3 topography code (``C18.2``). A value that cannot
be read is left out (the model treats it as missing) and logged, never guessed.
"""

from __future__ import annotations

import logging
import re

from app.clinical import ClinicalFields
from ml.crc.clinical import SITES, CrcClinical

log = logging.getLogger(__name__)

_T = re.compile(r"^(?:[cpy]{0,2}|yp|yc)T(is|[0-4])[a-d]?$", re.IGNORECASE)
_N = re.compile(r"^(?:[cpy]{0,2}|yp|yc)N([0-2])[a-c]?$", re.IGNORECASE)
_ICDO3_SITE = {
    "C18.0": "right colon", "C18.1": "right colon", "C18.2": "right colon",
    "C18.3": "right colon", "C18.4": "right colon", "C18.5": "left colon",
    "C18.6": "left colon", "C18.7": "left colon", "C19.9": "rectum", "C20.9": "rectum",
}


def stage_number(code: str, pattern: re.Pattern[str]) -> int | None:
    """The number of an AJCC T or N category (``pT3`` -> 3, ``pN1a`` -> 1; ``Tis`` -> 1
    is not assumed: it gives None, like ``TX``)."""
    match = pattern.match(code.strip())
    if match is None or match.group(1).lower() == "is":
        return None
    return int(match.group(1))


def tumour_site(value: str) -> str | None:
    """One of model A's sites from site text or an ICD-O-3 topography code."""
    text = value.strip()
    lowered = text.lower()
    if lowered in SITES:
        return lowered
    code = text.split("^")[0].upper()
    if re.fullmatch(r"C\d\d", code):
        code += ".9"
    return _ICDO3_SITE.get(code)


def crc_clinical(fields: ClinicalFields | None) -> CrcClinical | None:
    """Model A's clinical record, or None when the store knows nothing of the patient."""
    if fields is None or len(fields.missing) == 9:
        return None
    t = None if fields.t is None else stage_number(fields.t.value, _T)
    n = None if fields.n is None else stage_number(fields.n.value, _N)
    site = None if fields.site is None else tumour_site(fields.site.value)
    for name, raw, read in (("T", fields.t, t), ("N", fields.n, n), ("site", fields.site, site)):
        if raw is not None and read is None:
            log.warning("clinical %s value %r is not one model A reads; treated as missing",
                        name, raw.value)
    sex = None if fields.sex is None or fields.sex.value not in ("M", "F") else fields.sex.value
    age = None if fields.age_years is None else fields.age_years.value
    return CrcClinical(
        t_stage=t, n_stage=n,
        cea_ug_l=None if fields.cea_ug_l is None else max(fields.cea_ug_l.value, 0.0),
        ca19_9_u_ml=None if fields.ca19_9_u_ml is None else max(fields.ca19_9_u_ml.value, 0.0),
        age_years=age if age is None or 0 <= age <= 130 else None, sex=sex, site=site)
