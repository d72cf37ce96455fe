"""Series summaries, contrast phase classification and arterial + venous pairing.

Used by :mod:`app.routing`. :class:`SeriesSummary` is what the router knows of a
series: one header's tags and the instance count. :func:`classify_phase` reads the
series description in the vendors' styles first (Siemens ``Abdomen 3.0 B30f ART``,
GE ``PORTAL VENOUS 2.5mm``, Philips ``Art Phase 3mm``, Canon ``AP 5.0 FC08``,
``nativ``, ``w/o``), then the Contrast/Bolus module (absent means no contrast:
the CT IOD makes it required when contrast was given), then the delay between
ContrastBolusStartTime and the acquisition time. :func:`pair_phases` picks the
best arterial + venous pair for pipeline B.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset

from ml.errors import OncopacsError

Phase = Literal["arterial", "venous", "non-contrast", "unknown"]

_LOCALIZER = re.compile(r"\b(topogram|scout|surview|localizer|scanogram|locator)\b")
_WITHOUT = re.compile(r"\bw/o\b|\bwithout\b|\bohne\b")
_WORDS: dict[str, frozenset[str]] = {
    "arterial": frozenset({"art", "arterial", "arteriell", "arterielle", "arteriel", "ap",
                           "hap", "lap", "eap", "angio", "cta", "pancreatic", "artph"}),
    "venous": frozenset({"ven", "venous", "venös", "venoes", "venos", "veineux", "pv", "pvp",
                         "portal", "portalvenous", "portovenous", "portalvenös"}),
    "non-contrast": frozenset({"nativ", "native", "nc", "noncontrast", "noncon", "unenhanced",
                               "nonenhanced", "plain", "precontrast"}),
    "delayed": frozenset({"delayed", "delay", "equilibrium", "excretory", "nephrographic",
                          "urographic", "spätphase"}),
}
_AS_PHASE: dict[str, Phase] = {"arterial": "arterial", "venous": "venous",
                               "non-contrast": "non-contrast", "delayed": "unknown"}
_PHRASES = {"non contrast": "non-contrast", "non con": "non-contrast",
            "pre contrast": "non-contrast", "no contrast": "non-contrast",
            "non enhanced": "non-contrast", "porto venous": "venous"}


class RoutingError(OncopacsError):
    """A study or a routing configuration cannot be evaluated."""

@dataclass(frozen=True)
class SeriesSummary:
    """What the router knows of one series: one header's tags and the instance count."""

    series_uid: str
    series_number: int | None
    modality: str
    sop_class_uid: str
    instances: int
    series_description: str = ""
    protocol_name: str = ""
    study_description: str = ""
    body_part: str = ""
    image_type: tuple[str, ...] = ()
    contrast_agent: bool = False
    contrast_start_s: float | None = None
    acquisition_s: float | None = None
    slice_thickness_mm: float | None = None
    orientation: tuple[float, ...] | None = None
    frame_of_reference_uid: str = ""
    rows: int | None = None
    columns: int | None = None
    procedure_codes: frozenset[str] = frozenset()

    @classmethod
    def from_dataset(cls, ds: Dataset, instances: int) -> SeriesSummary:
        """Summarise a series from one of its headers (pixel data not needed).

        Raises
        ------
        RoutingError
            If the header has no SeriesInstanceUID.
        """
        if "SeriesInstanceUID" not in ds:
            raise RoutingError(f"header of SOP instance {ds.get('SOPInstanceUID', '?')} "
                               "has no SeriesInstanceUID")
        codes = {str(item.get("CodeValue", "")) for kw in (
            "ProcedureCodeSequence", "RequestedProcedureCodeSequence",
            "PerformedProtocolCodeSequence") for item in ds.get(kw, [])}
        iop = ds.get("ImageOrientationPatient")
        agent = bool(str(ds.get("ContrastBolusAgent", "")).strip()
                     or ds.get("ContrastBolusAgentSequence"))
        return cls(
            series_uid=str(ds.SeriesInstanceUID),
            series_number=_int(ds.get("SeriesNumber")),
            modality=str(ds.get("Modality", "")), sop_class_uid=str(ds.get("SOPClassUID", "")),
            instances=instances, series_description=str(ds.get("SeriesDescription", "")),
            protocol_name=str(ds.get("ProtocolName", "")),
            study_description=str(ds.get("StudyDescription", "")),
            body_part=str(ds.get("BodyPartExamined", "")),
            image_type=tuple(str(v).upper() for v in values_of(ds.get("ImageType"))),
            contrast_agent=agent, contrast_start_s=_tm_s(ds.get("ContrastBolusStartTime")),
            acquisition_s=_tm_s(ds.get("AcquisitionTime") or ds.get("SeriesTime")),
            slice_thickness_mm=to_float(ds.get("SliceThickness")),
            orientation=tuple(float(v) for v in iop) if iop and len(iop) == 6 else None,
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            rows=_int(ds.get("Rows")), columns=_int(ds.get("Columns")),
            procedure_codes=frozenset(c for c in codes if c))

    def label(self) -> str:
        """``series 2 'Abdomen 3.0 B30f ART'`` for reasons and logs (no patient data)."""
        number = self.series_number if self.series_number is not None else self.series_uid
        return f"series {number} '{self.series_description}'"

    @property
    def axial(self) -> bool:
        """Slices are axial: orientation normal within ~25 degrees of z, else ImageType AXIAL."""
        if self.orientation is None:
            return "AXIAL" in self.image_type
        r, c = self.orientation[:3], self.orientation[3:]
        return abs(r[0] * c[1] - r[1] * c[0]) >= 0.9

    @property
    def coverage_mm(self) -> float | None:
        """Instances times slice thickness (an estimate from one header)."""
        return None if self.slice_thickness_mm is None else self.instances * self.slice_thickness_mm


def values_of(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str) else [value]


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def to_float(value: object) -> float | None:
    try:
        return float(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _tm_s(value: object) -> float | None:
    """DICOM TM (``HHMMSS.FFFFFF`` or the old ``HH:MM:SS``) as seconds after midnight."""
    text = str(value or "").strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if match is None:
        return None
    hh, mm, ss, frac = match.groups()
    return int(hh) * 3600 + int(mm or 0) * 60 + int(ss or 0) + float(frac or 0)


class PhaseSettings(BaseModel):
    """Delay windows (seconds after ContrastBolusStartTime) used when descriptions are silent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    arterial_delay_s: tuple[float, float] = (10.0, 50.0)
    venous_delay_s: tuple[float, float] = (50.0, 120.0)


def _description_phases(description: str) -> set[str]:
    text = description.lower()
    found = {"non-contrast"} if _WITHOUT.search(text) else set()
    words = [w for w in re.split(r"[^0-9a-zäöüéè]+", text) if w]
    for pair in itertools.pairwise(words):
        if (phase := _PHRASES.get(" ".join(pair))) is not None:
            found.add(phase)
    found.update(phase for phase, vocab in _WORDS.items() if vocab.intersection(words))
    return found


def classify_phase(series: SeriesSummary, settings: PhaseSettings | None = None) -> Phase:
    """The contrast phase of a series.

    The series description decides when it names exactly one phase (Siemens
    ``Abdomen 3.0 B30f ART``, GE ``PORTAL VENOUS 2.5mm``, Philips ``Art Phase 3mm``,
    Canon ``AP 5.0 FC08`` / ``PVP``, ``nativ``, ``w/o``). Delayed/equilibrium series
    and localizers are ``"unknown"``. Otherwise a series without a Contrast/Bolus
    agent is ``"non-contrast"``, and one with an agent is placed by its delay after
    ContrastBolusStartTime (arterial about 10-50 s, venous 50-120 s by default).
    """
    settings = settings or PhaseSettings()
    text = series.series_description.lower()
    if "LOCALIZER" in series.image_type or _LOCALIZER.search(text):
        return "unknown"
    found = _description_phases(series.series_description)
    if len(found) == 1:
        return _AS_PHASE[found.pop()]
    if not found and not series.contrast_agent:
        return "non-contrast"
    acquired, start = series.acquisition_s, series.contrast_start_s
    if series.contrast_agent and acquired is not None and start is not None:
        delay = (acquired - start) % 86400.0
        if settings.arterial_delay_s[0] <= delay < settings.arterial_delay_s[1]:
            return "arterial"
        if settings.venous_delay_s[0] <= delay <= settings.venous_delay_s[1]:
            return "venous"
    return "unknown"


def contrast_enhanced(series: SeriesSummary, settings: PhaseSettings | None = None) -> bool:
    """A contrast agent is recorded or the description names a contrast phase."""
    phase = classify_phase(series, settings)
    if phase == "non-contrast":
        return False
    return series.contrast_agent or phase != "unknown" or "delayed" in _description_phases(
        series.series_description)


@dataclass(frozen=True)
class PhasePair:
    """The arterial and venous series chosen for pipeline B."""

    arterial: SeriesSummary
    venous: SeriesSummary

    @property
    def same_frame_of_reference(self) -> bool:
        return bool(self.arterial.frame_of_reference_uid) and \
            self.arterial.frame_of_reference_uid == self.venous.frame_of_reference_uid


@dataclass(frozen=True)
class NoMatch:
    """Why nothing was found."""

    reason: str


def series_list(series: Sequence[SeriesSummary]) -> str:
    """``series 2 'ART', 3 'PV'`` for reasons."""
    if not series:
        return "no series"
    labels = [s.label() for s in sorted(series, key=lambda s: s.series_number or 0)]
    return "series " + ", ".join(label.removeprefix("series ") for label in labels)


def _pair_score(a: SeriesSummary, v: SeriesSummary) -> tuple[float, ...]:
    same_geometry = (a.rows, a.columns, a.instances, a.slice_thickness_mm) == \
        (v.rows, v.columns, v.instances, v.slice_thickness_mm)
    ordered = a.acquisition_s is None or v.acquisition_s is None or \
        a.acquisition_s <= v.acquisition_s
    thickness = max(a.slice_thickness_mm or 99.0, v.slice_thickness_mm or 99.0)
    return (float(PhasePair(a, v).same_frame_of_reference), float(same_geometry),
            float(ordered), -thickness, float(min(a.instances, v.instances)))


def pair_phases(series: Sequence[SeriesSummary],
                settings: PhaseSettings | None = None) -> PhasePair | NoMatch:
    """The best arterial + venous pair among ``series``.

    Preferred, in order: one frame of reference, the same geometry (matrix,
    slice count and thickness), arterial acquired before venous, the thinnest
    slices, the most slices.
    """
    phases = {s.series_uid: classify_phase(s, settings) for s in series}
    arterial = [s for s in series if phases[s.series_uid] == "arterial"]
    venous = [s for s in series if phases[s.series_uid] == "venous"]
    for name, found in (("arterial", arterial), ("venous", venous)):
        if not found:
            return NoMatch(f"no {name} phase found among {series_list(series)}")
    return max((PhasePair(a, v) for a in arterial for v in venous),
               key=lambda p: _pair_score(p.arterial, p.venous))
