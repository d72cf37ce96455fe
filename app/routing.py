"""Which pipeline a complete study goes to: A (CRC liver metastasis), B (PDAC), or none.

The router sees one header per series (:class:`SeriesSummary`) and the names of
the clinical fields the clinical store holds for the patient (``pT``, ``pN``,
``CA19-9`` ...; :data:`LOINC_FIELDS` maps HL7 OBX codes to them). Rules from the
configuration (:class:`RoutingSettings`, loadable from YAML) are tried in order;
the first that holds picks the pipeline. An unmatched study gets a reason that
names what each rule missed, e.g. ``no arterial phase found among series 3
'PORTAL VENOUS 2.5mm'``.

Default policy (:func:`default_rules`, ``deploy/routing.yaml``), in order:

1. ``pdac-pancreas-protocol`` (B): an arterial + portal-venous pair and a pancreas
   protocol (study/series description or protocol name naming the pancreas, or a
   site-configured procedure code). The order placed for this very study is the most
   specific evidence, so it comes first.
2. ``crc-colorectal-pathology`` (A): a contrast-enhanced axial CT covering the
   abdomen and a colorectal pathology report (pT and pN) for the patient.
3. ``pdac-clinical-diagnosis`` (B): a phase pair and a PDAC diagnosis field.
4. ``pdac-biphasic-ca19-9`` (B): a phase pair, a CA 19-9 result and *no* colorectal
   pathology report. This is what routes the synthetic PDAC patients, whose CT looks
   like the CRC patients'. It depends on what the clinical store knows when the study
   is routed (a CRC pathology report that arrives later would not be seen); sites with
   pancreas protocol codes should rely on rule 1 and may remove this one.

Phases and pairs come from :mod:`app.routing_phases` (re-exported here).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import hl7
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.routing_phases import (
    NoMatch,
    Phase,
    PhasePair,
    PhaseSettings,
    RoutingError,
    SeriesSummary,
    classify_phase,
    contrast_enhanced,
    pair_phases,
    series_list,
    to_float,
    values_of,
)
from ml.errors import ConfigError

__all__ = ["ICD10_FIELDS", "LOINC_FIELDS", "NoMatch", "Phase", "PhasePair", "PhaseSettings",
           "Pipeline", "RoutingDecision", "RoutingError", "RoutingRule", "RoutingSettings",
           "SeriesRequirement", "SeriesSummary", "TagCondition", "classify_phase",
           "clinical_field_names", "clinical_fields_from_hl7", "contrast_enhanced", "default_rules",
           "load_routing_settings", "pair_phases", "route", "series_list"]

Pipeline = Literal["A", "B"]
TagName = Literal["Modality", "SOPClassUID", "BodyPartExamined", "SeriesDescription",
                  "ProtocolName", "StudyDescription", "ImageType", "SliceThickness",
                  "NumberOfInstances", "ProcedureCodes"]

ICD10_FIELDS = {"C18": "crc_diagnosis", "C19": "crc_diagnosis", "C20": "crc_diagnosis",
                "C25": "pdac_diagnosis"}
"""HL7 DG1-3 ICD-10 category prefixes and the diagnosis field names rules refer to."""
LOINC_FIELDS = {"21899-0": "pT", "21900-6": "pN", "21901-4": "pM", "21902-2": "stage_group",
                "2039-6": "CEA", "24108-3": "CA19-9", "22637-3": "pathology_diagnosis"}
"""HL7 OBX-3 LOINC codes and the clinical field names rules refer to."""


class TagCondition(BaseModel):
    """One test on a tag: ``equals``, ``any_of``, ``regex`` (case-insensitive search) or a range.

    Multi-valued tags (ImageType, ProcedureCodes) hold when any value does. An
    absent or empty tag fails unless ``missing_ok``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: TagName
    equals: str | None = None
    any_of: list[str] | None = None
    regex: str | None = None
    min: float | None = None
    max: float | None = None
    missing_ok: bool = False

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex {value!r} does not compile: {exc}") from exc
        return value

    def values(self, s: SeriesSummary) -> list[str]:
        raw: dict[str, object] = {
            "Modality": s.modality, "SOPClassUID": s.sop_class_uid, "BodyPartExamined":
            s.body_part, "SeriesDescription": s.series_description, "ProtocolName":
            s.protocol_name, "StudyDescription": s.study_description, "ImageType":
            list(s.image_type), "SliceThickness": s.slice_thickness_mm, "NumberOfInstances":
            s.instances, "ProcedureCodes": sorted(s.procedure_codes)}
        return [str(v) for v in values_of(raw[self.tag]) if str(v).strip()]

    def holds(self, s: SeriesSummary) -> bool:
        values = self.values(s)
        if not values:
            return self.missing_ok
        return any(self._one(v) for v in values)

    def _one(self, value: str) -> bool:
        if self.equals is not None and value.upper() != self.equals.upper():
            return False
        if self.any_of is not None and value.upper() not in {a.upper() for a in self.any_of}:
            return False
        if self.regex is not None and not re.search(self.regex, value, re.IGNORECASE):
            return False
        if self.min is not None or self.max is not None:
            number = to_float(value)
            lo = self.min if self.min is not None else float("-inf")
            hi = self.max if self.max is not None else float("inf")
            return number is not None and lo <= number <= hi
        return True

    def describe(self) -> str:
        parts = [f"= {self.equals!r}" if self.equals is not None else "",
                 f"in {self.any_of}" if self.any_of is not None else "",
                 f"matching /{self.regex}/" if self.regex is not None else "",
                 f">= {self.min:g}" if self.min is not None else "",
                 f"<= {self.max:g}" if self.max is not None else ""]
        return f"{self.tag} " + " ".join(p for p in parts if p)


class SeriesRequirement(BaseModel):
    """What a series must be for a rule: modality, contrast, orientation, size, tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    modality: str = "CT"
    contrast: bool | None = True
    axial: bool = True
    min_instances: int = Field(default=1, ge=1)
    min_coverage_mm: float | None = None
    tags: list[TagCondition] = Field(default_factory=list)

    def holds(self, s: SeriesSummary, phase: PhaseSettings) -> bool:
        coverage = s.coverage_mm
        return (s.modality.upper() == self.modality.upper()
                and (self.contrast is None or contrast_enhanced(s, phase) == self.contrast)
                and (s.axial or not self.axial) and s.instances >= self.min_instances
                and (self.min_coverage_mm is None
                     or (coverage is not None and coverage >= self.min_coverage_mm))
                and all(t.holds(s) for t in self.tags))

    def describe(self) -> str:
        words = {True: "contrast-enhanced ", False: "non-contrast ", None: ""}[self.contrast]
        text = f"{words}{'axial ' if self.axial else ''}{self.modality} series with >= " \
               f"{self.min_instances} slices"
        if self.min_coverage_mm is not None:
            text += f" covering >= {self.min_coverage_mm:g} mm"
        return text + "".join(f", {t.describe()}" for t in self.tags)


class RoutingRule(BaseModel):
    """One rule: all of its conditions must hold for ``pipeline`` to apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    pipeline: Pipeline
    series: SeriesRequirement = Field(default_factory=SeriesRequirement)
    phase_pair: bool = False
    study_any: list[TagCondition] = Field(default_factory=list)
    study_any_label: str = "study evidence"
    requires_clinical: list[str] = Field(default_factory=list)
    excludes_clinical: list[str] = Field(default_factory=list)


class RoutingSettings(BaseModel):
    """The routing rules, tried in order, and the phase timing windows."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rules: list[RoutingRule] = Field(default_factory=lambda: default_rules())
    phase: PhaseSettings = Field(default_factory=PhaseSettings)


@dataclass(frozen=True)
class RoutingDecision:
    """The pipeline chosen (``None``: none applies), by which rule, on which series, and why."""

    pipeline: Pipeline | None
    rule: str | None
    series_uids: tuple[str, ...]
    reason: str
    pair: PhasePair | None = None


def _evaluate(rule: RoutingRule, series: Sequence[SeriesSummary], clinical: frozenset[str],
              phase: PhaseSettings) -> RoutingDecision | NoMatch:
    if missing := [f for f in rule.requires_clinical if f not in clinical]:
        return NoMatch(f"no clinical field {', '.join(missing)} for the patient")
    if present := [f for f in rule.excludes_clinical if f in clinical]:
        return NoMatch(f"clinical field {', '.join(present)} present")
    if rule.study_any and not any(t.holds(s) for t in rule.study_any for s in series):
        return NoMatch(f"no {rule.study_any_label} ("
                       + " or ".join(t.describe() for t in rule.study_any) + ")")
    fitting = [s for s in series if rule.series.holds(s, phase)]
    if not fitting:
        return NoMatch(f"no {rule.series.describe()} among {series_list(series)}")
    if rule.phase_pair:
        pair = pair_phases(fitting, phase)
        if isinstance(pair, NoMatch):
            return pair
        return RoutingDecision(rule.pipeline, rule.name, (pair.arterial.series_uid,
                               pair.venous.series_uid), f"rule {rule.name!r} matched", pair)
    order = {"venous": 0, "arterial": 1}
    best = min(fitting, key=lambda s: (order.get(classify_phase(s, phase), 2),
                                       s.slice_thickness_mm or 99.0, -s.instances))
    return RoutingDecision(rule.pipeline, rule.name, (best.series_uid,),
                           f"rule {rule.name!r} matched")


def route(series: Sequence[SeriesSummary], clinical: Iterable[str],
          settings: RoutingSettings | None = None) -> RoutingDecision:
    """Try the rules in order on a complete study; the first that holds decides.

    Parameters
    ----------
    series
        One summary per series of the study.
    clinical
        Names of the clinical fields known for the patient (see :data:`LOINC_FIELDS`).
    settings
        The rules; :func:`default_rules` when omitted.

    Returns
    -------
    RoutingDecision
        With ``pipeline`` ``None`` and a reason naming what each rule missed when
        no rule holds.
    """
    settings = settings or RoutingSettings()
    fields = frozenset(clinical)
    misses: list[str] = []
    for rule in settings.rules:
        outcome = _evaluate(rule, series, fields, settings.phase)
        if isinstance(outcome, RoutingDecision):
            return outcome
        misses.append(f"{rule.name} ({rule.pipeline}): {outcome.reason}")
    return RoutingDecision(None, None, (), "no rule matched: " + "; ".join(misses))


def _abdomen_ct(min_instances: int = 10, min_coverage_mm: float = 150.0) -> SeriesRequirement:
    return SeriesRequirement(min_instances=min_instances, min_coverage_mm=min_coverage_mm)


def default_rules() -> list[RoutingRule]:
    """The default policy described in the module docstring (also ``deploy/routing.yaml``)."""
    pancreas = [TagCondition(tag=tag, regex=r"pancrea|whipple|\bpdac\b")
                for tag in ("StudyDescription", "ProtocolName", "SeriesDescription")]
    return [
        RoutingRule(name="pdac-pancreas-protocol", pipeline="B", series=_abdomen_ct(),
                    phase_pair=True, study_any=pancreas, study_any_label="pancreas protocol"),
        RoutingRule(name="crc-colorectal-pathology", pipeline="A", series=_abdomen_ct(),
                    requires_clinical=["pT", "pN"]),
        RoutingRule(name="pdac-clinical-diagnosis", pipeline="B", series=_abdomen_ct(),
                    phase_pair=True, requires_clinical=["pdac_diagnosis"]),
        RoutingRule(name="pdac-biphasic-ca19-9", pipeline="B", series=_abdomen_ct(),
                    phase_pair=True, requires_clinical=["CA19-9"],
                    excludes_clinical=["pT", "pN"]),
    ]


def load_routing_settings(path: Path) -> RoutingSettings:
    """Read routing settings from a YAML file (a mapping with ``rules`` and ``phase``).

    Raises
    ------
    ConfigError
        If the file cannot be read, is not YAML, or does not validate (the
        message names the file and the offending field).
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"routing configuration {path}: {exc}") from exc
    try:
        return RoutingSettings.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}"
                             for err in exc.errors())
        raise ConfigError(f"routing configuration {path}: {problems}") from exc


STORE_FIELDS = {"t": "T", "n": "N", "m": "M", "stage_group": "stage_group", "cea_ug_l": "CEA",
                "ca19_9_u_ml": "CA19-9", "site": "site"}
"""Attributes of ``app.clinical.ClinicalFields`` and their routing names (T/N/M get the
AJCC prefix of their value: ``pT3`` gives ``pT``, ``cM0`` gives ``cM``)."""


def clinical_field_names(fields: object) -> frozenset[str]:
    """Routing names of the known fields of a clinical store record.

    ``fields`` is an ``app.clinical.ClinicalFields`` (read by attribute: each known
    field is an object with a ``value``, an unknown one is None). Ask the store for
    the values known *now* (not only before the study), so that a pathology report
    written after the CT counts.
    """
    names: set[str] = set()
    for attribute, name in STORE_FIELDS.items():
        observed = getattr(fields, attribute, None)
        if observed is None:
            continue
        if name in ("T", "N", "M"):
            prefix = str(getattr(observed, "value", ""))[:1].lower()
            name = {"p": "p", "c": "c"}.get(prefix, "") + name
        names.add(name)
    return frozenset(names)


def clinical_fields_from_hl7(messages: Iterable[str]) -> frozenset[str]:
    """Clinical field names in HL7 v2 messages.

    OBX segments with a value whose OBX-3 code is in :data:`LOINC_FIELDS`, and DG1
    segments whose DG1-3 ICD-10 code starts with a prefix in :data:`ICD10_FIELDS`.

    Raises
    ------
    RoutingError
        If a message cannot be parsed as HL7 v2.
    """
    fields: set[str] = set()
    for text in messages:
        try:
            message = hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r").strip())
        except Exception as exc:  # the hl7 package raises bare ParseException/IndexError
            raise RoutingError(f"HL7 message cannot be parsed: {exc}") from exc
        for segment in message:
            kind = str(segment[0])
            if kind == "OBX" and len(segment) > 5 and str(segment[5]).strip():
                code = str(segment[3]).split("^")[0]
                if code in LOINC_FIELDS:
                    fields.add(LOINC_FIELDS[code])
            elif kind == "DG1" and len(segment) > 3:
                code = str(segment[3]).split("^")[0].upper()
                fields.update(name for prefix, name in ICD10_FIELDS.items()
                              if code.startswith(prefix))
    return frozenset(fields)
