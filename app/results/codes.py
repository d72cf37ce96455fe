"""Coded concepts of the oncopacs DICOM results, standard where a standard code exists.

Standard codes come from pydicom's code dictionary (DICOM PS3.16), so their meanings are
the standard's: SNOMED CT (``SCT``) for anatomy, morphology and risk levels, DICOM
(``DCM``) for algorithm and equipment concepts, LOINC (``LN``) for the procedure and
clinical information, UCUM for units.

Concepts that have no standard code (the metachronous liver metastasis risk of model A,
the tumour-stroma ratio class of model B, the inputs a model used) are coded in the
private scheme :data:`PRIVATE_SCHEME` (Coding Scheme Designator ``99ONCOPACS``, version
:data:`PRIVATE_SCHEME_VERSION`). Every SR that uses it declares it in its Coding Scheme
Identification Sequence (:func:`private_coding_scheme`). The private codes are:

================  ==============================================================
Code value        Code meaning
================  ==============================================================
LMRISK3Y          Metachronous liver metastasis risk within 3 years
LMPROB3Y          Probability of metachronous liver metastasis within 3 years
LMRISKGRP         Liver metastasis risk group
TSR               Tumour-stroma ratio
TSRHIGHP          Probability of high tumour-stroma ratio
TSRCLASS          Tumour-stroma ratio class
TSRHIGH           High tumour-stroma ratio
TSRLOW            Low tumour-stroma ratio
INUSED            Model input used
INMISSING         Model input missing
IN-CTART          Arterial phase CT
IN-CTVEN          Portal venous phase CT
IN-TNM            TNM stage
IN-CEA            Serum CEA
IN-CA199          Serum CA 19-9
IN-AGE            Age at CT
IN-SEX            Sex
IN-SITE           Primary tumour site
ATTN              Model attention weight (SEG property type of model A's slide map)
================  ==============================================================

Code values and meanings never change once released: a new meaning gets a new value.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ATTENTION_PROPERTY",
    "FINDING_CODES",
    "INPUT_CODES",
    "PRIVATE_SCHEME",
    "PRIVATE_SCHEME_VERSION",
    "PROBABILITY_UNIT",
    "PROCEDURE_REPORTED",
    "QUALITATIVE_CODES",
    "STRUCTURES",
    "VOLUME_UNIT",
    "FindingCodes",
    "Structure",
    "private_coding_scheme",
]

PRIVATE_SCHEME = "99ONCOPACS"
PRIVATE_SCHEME_VERSION = "1"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning, scheme_version=None)


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item that declares ``99ONCOPACS``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="oncopacs private codes (app/results/codes.py)",
        version=PRIVATE_SCHEME_VERSION,
        responsible_organization="oncopacs project",
    )


# ---------------------------------------------------------------- segmented structures


@dataclass(frozen=True)
class Structure:
    """A segmented structure and its codes (DICOM CID 7150 category, CID 7151 type).

    Attributes
    ----------
    name
        Stable key: the SEG segment's Tracking ID and the key of the volumes mapping
        (e.g. ``"liver"``).
    label
        Segment Label shown by viewers (e.g. ``"Liver"``).
    category
        Segmented Property Category (CID 7150).
    property_type
        Segmented Property Type (CID 7151).
    anatomic_region
        Where a morphologically abnormal structure lies (e.g. the colon for a
        colorectal primary), or ``None``.
    colour_rgb
        Display colour (8-bit RGB), used for the SEG's Recommended Display CIELab
        Value and the result card's contours.
    """

    name: str
    label: str
    category: Code
    property_type: Code
    anatomic_region: Code | None
    colour_rgb: tuple[int, int, int]


_ANATOMY = codes.SCT.AnatomicalStructure
_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure

STRUCTURES: dict[str, Structure] = {
    s.name: s for s in (
        Structure("liver", "Liver", _ANATOMY, codes.SCT.Liver, None, (221, 130, 101)),
        Structure("pancreas", "Pancreas", _ANATOMY, codes.SCT.Pancreas, None, (249, 180, 111)),
        Structure("colorectal_tumour", "Colorectal tumour", _ABNORMAL, codes.SCT.Neoplasm,
                  codes.SCT.Colon, (255, 40, 40)),
        Structure("pancreatic_tumour", "Pancreatic tumour", _ABNORMAL, codes.SCT.Neoplasm,
                  codes.SCT.Pancreas, (255, 40, 40)),
        Structure("spleen", "Spleen", _ANATOMY, codes.SCT.Spleen, None, (157, 108, 162)),
        Structure("kidneys", "Kidneys", _ANATOMY, codes.SCT.Kidney, None, (185, 102, 83)),
        Structure("vessels", "Aorta and portal vein", _ANATOMY, codes.SCT.BloodVessel, None,
                  (0, 151, 206)),
    )
}
"""The structures oncopacs segments, by :attr:`Structure.name`."""

# ---------------------------------------------------------------- SR concepts

PROCEDURE_REPORTED = codes.LN.CTUnspecifiedBodyRegion
"""TID 1500 Procedure Reported (CID 100): LOINC 25045-6 "CT unspecified body region"."""

VOLUME_UNIT = Code("ml", "UCUM", "milliliter")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
"""A UCUM annotation: dimensionless, value between 0 and 1."""

INPUT_USED = _private("INUSED", "Model input used")
INPUT_MISSING = _private("INMISSING", "Model input missing")


@dataclass(frozen=True)
class FindingCodes:
    """The concepts of one kind of model finding.

    Attributes
    ----------
    finding_type
        Finding type of the TID 1501 measurement group.
    finding_site
        Where the finding lies.
    probability
        Concept name of the probability NUM.
    qualitative
        Concept name of the qualitative evaluation (risk group, TSR class).
    values
        The allowed qualitative values, by their text (e.g. ``"high risk"``).
    """

    finding_type: Code
    finding_site: Code
    probability: Code
    qualitative: Code
    values: dict[str, Code]


FINDING_CODES: dict[str, FindingCodes] = {
    "crc_liver_metastasis_risk": FindingCodes(
        finding_type=_private("LMRISK3Y", "Metachronous liver metastasis risk within 3 years"),
        finding_site=codes.SCT.Liver,
        probability=_private("LMPROB3Y",
                             "Probability of metachronous liver metastasis within 3 years"),
        qualitative=_private("LMRISKGRP", "Liver metastasis risk group"),
        values={"high risk": codes.SCT.HighRisk, "low risk": codes.SCT.LowRisk},
    ),
    "pdac_tsr": FindingCodes(
        finding_type=_private("TSR", "Tumour-stroma ratio"),
        finding_site=codes.SCT.Pancreas,
        probability=_private("TSRHIGHP", "Probability of high tumour-stroma ratio"),
        qualitative=_private("TSRCLASS", "Tumour-stroma ratio class"),
        values={"high TSR": _private("TSRHIGH", "High tumour-stroma ratio"),
                "low TSR": _private("TSRLOW", "Low tumour-stroma ratio")},
    ),
}
"""Codes per :attr:`app.results.Finding.kind`."""

QUALITATIVE_CODES: dict[str, Code] = {
    text: code for fc in FINDING_CODES.values() for text, code in fc.values.items()
}

INPUT_CODES: dict[str, Code] = {
    "ct": codes.DCM.ComputedTomography,
    "ct_arterial": _private("IN-CTART", "Arterial phase CT"),
    "ct_venous": _private("IN-CTVEN", "Portal venous phase CT"),
    "wsi": codes.DCM.WholeSlideImaging,
    "clinical": codes.LN.ClinicalInformation,
    "tnm": _private("IN-TNM", "TNM stage"),
    "cea": _private("IN-CEA", "Serum CEA"),
    "ca19_9": _private("IN-CA199", "Serum CA 19-9"),
    "age": _private("IN-AGE", "Age at CT"),
    "sex": _private("IN-SEX", "Sex"),
    "site": _private("IN-SITE", "Primary tumour site"),
}
"""The model inputs a finding may list as used or missing, by name."""

ATTENTION_PROPERTY = _private("ATTN", "Model attention weight")
"""Segmented Property Type of model A's tile attention SEG on the slide."""
