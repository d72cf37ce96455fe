"""DICOM results of oncopacs: segmentation (SEG), TID 1500 report (SR), result card (SC).

The builders are plain functions over pydicom datasets and numpy arrays (no MONAI Deploy):
:func:`app.results.seg.build_seg`, :func:`app.results.sr.build_sr`,
:func:`app.results.card.build_card`. This module holds what they share: the model
identity, the model findings, the settings, the series numbering and the slice order.

Slice order
-----------
A label volume has shape ``(slices, rows, cols)`` and its slices follow the CT
datasets sorted by :func:`sort_slices`: ascending position along the slice normal
(the cross product of the row and column direction cosines of Image Orientation
(Patient)). For axial head-first images that is from caudal to cranial (ascending
patient z), the order of the synthetic cohort's ``ct/labels.npz``, whatever the
instance numbers are.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset

from app.results.codes import FINDING_CODES, INPUT_CODES
from ml.errors import OncopacsError

__all__ = [
    "RESEARCH_USE_LINE",
    "Finding",
    "FindingKind",
    "ModelIdentity",
    "ResultsError",
    "ResultsSettings",
    "SeriesNumbers",
    "check_label_volume",
    "result_series_numbers",
    "slice_spacing_mm",
    "sort_slices",
]

logger = logging.getLogger(__name__)

RESEARCH_USE_LINE = "Research use only \u2014 demo models trained on synthetic data"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ORIENTATION_TOLERANCE = 1e-4


class ResultsError(OncopacsError):
    """A DICOM result cannot be built from what it was given (series, labels, findings)."""


@dataclass(frozen=True)
class ModelIdentity:
    """The model package that produced a result.

    Attributes
    ----------
    name
        Package name (e.g. ``"crc-liver-metastasis"``), at most 64 characters.
    version
        Package version, at most 64 characters.
    sha256
        Hex SHA-256 of the package's weights (64 lower-case hex digits).
    demo
        True for the shipped demo models trained on the synthetic cohort: the result
        card then says :data:`RESEARCH_USE_LINE`.
    """

    name: str
    version: str
    sha256: str
    demo: bool = False

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("version", self.version)):
            if not value or len(value) > 64 or "\\" in value:
                raise ResultsError(f"model {what} {value!r} must be 1-64 characters "
                                   "without backslash")
        if not _SHA256.fullmatch(self.sha256):
            raise ResultsError(f"model {self.name} {self.version}: sha256 {self.sha256!r} "
                               "is not 64 lower-case hex digits")


FindingKind = Literal["crc_liver_metastasis_risk", "pdac_tsr"]


@dataclass(frozen=True)
class Finding:
    """One model's answer for one study.

    Attributes
    ----------
    kind
        ``"crc_liver_metastasis_risk"`` (model A) or ``"pdac_tsr"`` (model B).
    probability
        Probability of metachronous liver metastasis within 3 years (A) or of a high
        tumour-stroma ratio (B), between 0 and 1.
    qualitative
        ``"high risk"``/``"low risk"`` (A) or ``"high TSR"``/``"low TSR"`` (B).
    inputs_used, inputs_missing
        Names of model inputs (keys of :data:`app.results.codes.INPUT_CODES`, such as
        ``"ct"``, ``"wsi"``, ``"clinical"``, ``"ct_arterial"``); stored as tuples.
    model
        The model package that produced the finding.
    """

    kind: FindingKind
    probability: float
    qualitative: str
    inputs_used: Sequence[str]
    inputs_missing: Sequence[str]
    model: ModelIdentity

    def __post_init__(self) -> None:
        codes = FINDING_CODES.get(self.kind)
        if codes is None:
            raise ResultsError(f"finding kind {self.kind!r} is not one of {sorted(FINDING_CODES)}")
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise ResultsError(f"{self.kind} probability {self.probability!r} is not in [0, 1]")
        if self.qualitative not in codes.values:
            raise ResultsError(f"{self.kind} qualitative value {self.qualitative!r} is not one "
                               f"of {sorted(codes.values)}")
        object.__setattr__(self, "inputs_used", tuple(self.inputs_used))
        object.__setattr__(self, "inputs_missing", tuple(self.inputs_missing))
        unknown = [n for n in (*self.inputs_used, *self.inputs_missing) if n not in INPUT_CODES]
        if unknown:
            raise ResultsError(f"{self.kind} names unknown model inputs {unknown}; known: "
                               f"{sorted(INPUT_CODES)}")
        both = set(self.inputs_used) & set(self.inputs_missing)
        if both:
            raise ResultsError(f"{self.kind} lists inputs {sorted(both)} as used and missing")


class ResultsSettings(BaseModel):
    """How result objects are labelled and numbered.

    Series numbers are ``series_number_base`` + 0 (SEG), + 1 (SR), + 2 (card) when a base
    is configured, otherwise the largest series number already in the study plus
    ``series_number_offset`` (+ 0, 1, 2): deterministic, never random.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    manufacturer: Annotated[str, Field(min_length=1, max_length=64)] = "oncopacs"
    device_serial_number: Annotated[str, Field(min_length=1, max_length=64)] = "oncopacs-1"
    institution_name: Annotated[str | None, Field(max_length=64)] = None
    series_number_base: Annotated[int | None, Field(ge=1, le=2**31 - 3)] = None
    series_number_offset: Annotated[int, Field(ge=1, le=100_000)] = 100


@dataclass(frozen=True)
class SeriesNumbers:
    """Series Number of each result object."""

    seg: int
    sr: int
    card: int


def result_series_numbers(existing: Iterable[int], settings: ResultsSettings) -> SeriesNumbers:
    """Series numbers for the SEG, SR and card of a study.

    Parameters
    ----------
    existing
        The Series Numbers already in the study (e.g. of every CT series).
    settings
        ``series_number_base`` wins when set; otherwise ``max(existing) + offset``.

    Returns
    -------
    SeriesNumbers
        Three consecutive numbers.

    Raises
    ------
    ResultsError
        If the numbers would not fit the IS value representation.
    """
    if settings.series_number_base is not None:
        first = settings.series_number_base
    else:
        first = max((int(n) for n in existing), default=0) + settings.series_number_offset
    if first + 2 > 2**31 - 1:
        raise ResultsError(f"result series number {first} + 2 does not fit a DICOM IS value")
    return SeriesNumbers(first, first + 1, first + 2)


def _normal(ds: Dataset) -> np.ndarray:
    cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return np.cross(cosines[:3], cosines[3:])


def sort_slices(ct: Sequence[Dataset]) -> list[Dataset]:
    """The CT datasets in label-volume order: ascending along the slice normal.

    Parameters
    ----------
    ct
        Single-frame images of one series, in any order.

    Returns
    -------
    list of Dataset
        The same datasets, sorted.

    Raises
    ------
    ResultsError
        If the list is empty, mixes series or orientations, lacks geometry, or holds two
        slices at the same position.
    """
    if not ct:
        raise ResultsError("no CT datasets given")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in ct}
    if len(series) != 1:
        raise ResultsError(f"CT datasets come from {len(series)} series {sorted(series)}; "
                           "give one series")
    first = ct[0]
    for ds in ct:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise ResultsError(f"series {first.SeriesInstanceUID} has no {keyword} on "
                                   f"instance {ds.get('SOPInstanceUID')}")
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient],
                           [float(v) for v in first.ImageOrientationPatient],
                           atol=_ORIENTATION_TOLERANCE):
            raise ResultsError(f"series {first.SeriesInstanceUID}: instance {ds.SOPInstanceUID} "
                               "has another Image Orientation (Patient)")
    normal = _normal(first)

    def along(ds: Dataset) -> float:
        return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))

    ordered = sorted(ct, key=along)
    positions = np.array([along(ds) for ds in ordered])
    if np.any(np.diff(positions) <= 1e-3):
        raise ResultsError(f"series {first.SeriesInstanceUID} has two slices at one position")
    return ordered


def slice_spacing_mm(ordered: Sequence[Dataset]) -> tuple[float, float, float]:
    """Voxel spacing ``(slice, row, column)`` in mm of slices sorted by :func:`sort_slices`.

    The slice spacing is the mean distance between consecutive slices along the normal
    (Slice Thickness for a single slice); the row spacing is the distance between rows.

    Raises
    ------
    ResultsError
        If the slices are not evenly spaced (within 1 %).
    """
    row_mm, col_mm = (float(v) for v in ordered[0].PixelSpacing)
    if len(ordered) == 1:
        return float(ordered[0].get("SliceThickness", 1.0) or 1.0), row_mm, col_mm
    normal = _normal(ordered[0])
    z = np.array([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for ds in ordered])
    steps = np.diff(z)
    if np.ptp(steps) > 0.01 * float(np.mean(steps)):
        raise ResultsError(f"series {ordered[0].SeriesInstanceUID} is not evenly spaced: "
                           f"steps from {steps.min():.3f} to {steps.max():.3f} mm")
    return float(np.mean(steps)), row_mm, col_mm


def check_label_volume(labels: np.ndarray, ordered: Sequence[Dataset]) -> None:
    """Check that ``labels`` is a uint8 ``(slices, rows, cols)`` volume on ``ordered``.

    Raises
    ------
    ResultsError
        If the type or shape does not match the series.
    """
    first = ordered[0]
    expected = (len(ordered), int(first.Rows), int(first.Columns))
    if labels.dtype != np.uint8 or labels.shape != expected:
        raise ResultsError(f"label volume {labels.dtype} {labels.shape} does not match series "
                           f"{first.SeriesInstanceUID}: expected uint8 {expected}")
