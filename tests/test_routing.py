"""Routing a complete study to pipeline A, B or none, and contrast phase classification."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, MRImageStorage

from app.routing import (
    NoMatch,
    PhasePair,
    RoutingRule,
    RoutingSettings,
    SeriesRequirement,
    SeriesSummary,
    TagCondition,
    classify_phase,
    clinical_field_names,
    clinical_fields_from_hl7,
    default_rules,
    load_routing_settings,
    pair_phases,
    route,
)
from ml.errors import ConfigError
from ml.synth.centres import CENTRES
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.synth.sizes import SIZES

REPO = Path(__file__).resolve().parents[1]
CRC = frozenset({"pT", "pN", "pM", "stage_group", "CEA", "CA19-9"})
PDAC = frozenset({"CEA", "CA19-9"})
BOLUS_S = 10 * 3600.0


def ct(number: int, description: str, **changes: Any) -> SeriesSummary:
    """A plausible contrast CT series of 80 axial 3 mm slices; ``changes`` override fields."""
    base = SeriesSummary(
        series_uid=f"1.2.826.0.1.3680043.10.1{number}", series_number=number, modality="CT",
        sop_class_uid=CTImageStorage, instances=80, series_description=description,
        study_description="CT ABDOMEN PELVIS WITH CONTRAST", body_part="ABDOMEN",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"), contrast_agent=True,
        slice_thickness_mm=3.0, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        frame_of_reference_uid="1.2.826.0.1.3680043.10.99", rows=512, columns=512)
    return dataclasses.replace(base, **changes)


def timed(number: int, description: str, delay_s: float, **changes: Any) -> SeriesSummary:
    return ct(number, description, contrast_start_s=BOLUS_S, acquisition_s=BOLUS_S + delay_s,
              **changes)


# ------------------------------------------------------------------ phases


@pytest.mark.parametrize("centre", CENTRES, ids=lambda c: c.code)
@pytest.mark.parametrize("phase", ["arterial", "venous"])
@pytest.mark.parametrize("size_name", sorted(SIZES))
def test_every_synthetic_centre_style_classifies(centre: Any, phase: str, size_name: str) -> None:
    thickness = SIZES[size_name].slice_thickness_mm(centre.slice_thickness_mm)
    description = centre.describe(phase)
    # the description alone decides: no contrast tags, no timing
    assert classify_phase(ct(2, description, contrast_agent=False,
                             slice_thickness_mm=thickness)) == phase
    # and the opposite timing does not override it
    wrong_delay = 70.0 if phase == "arterial" else 35.0
    assert classify_phase(timed(2, description, wrong_delay)) == phase


REAL_WORLD = [
    ("Abdomen 3.0 B30f ART", "arterial"), ("ARTERIAL 2.5mm", "arterial"),
    ("Art Phase 3mm", "arterial"), ("AP 5.0 FC08", "arterial"),
    ("Late Arterial 5mm", "arterial"), ("Early Arterial 1.25mm", "arterial"),
    ("LATE ART 1.0 Br40", "arterial"), ("DE_Abdomen_ART_1.5_Br40_Mono70keV", "arterial"),
    ("PANCREATIC PHASE 1.25MM", "arterial"), ("CTA Abd 1.0 Bv36", "arterial"),
    ("Arteriell 1.0 Br40", "arterial"), ("HAP 2mm STND", "arterial"),
    ("PORTAL VENOUS 2.5mm", "venous"), ("Portal Venous 5mm", "venous"),
    ("Ven Phase 5mm", "venous"), ("VEN 3.0 B31f", "venous"), ("PV 5mm", "venous"),
    ("PVP 5.0 FC08", "venous"), ("Portalvenös 3mm", "venous"), ("Porto-venous 3 mm", "venous"),
    ("Abd PV 70s 3mm", "venous"), ("VENOUS 1.25MM STND", "venous"),
    ("C+ PORTAL 5mm iDose 3", "venous"),
    ("Abdomen nativ 5.0 B30f", "non-contrast"), ("Non Contrast 5mm", "non-contrast"),
    ("NON-CON 5MM", "non-contrast"), ("Abd w/o 2.5mm", "non-contrast"),
    ("Pre-contrast 3mm", "non-contrast"), ("Unenhanced 5mm", "non-contrast"),
    ("NC 5mm SOFT", "non-contrast"), ("Plain Abdomen 5mm", "non-contrast"),
    ("Delayed 5mm", "unknown"), ("Equilibrium 3mm Br40", "unknown"),
    ("Topogram 0.6 T20f AP", "unknown"), ("Scout", "unknown"),
]


@pytest.mark.parametrize(("description", "phase"), REAL_WORLD)
def test_vendor_descriptions_classify(description: str, phase: str) -> None:
    assert classify_phase(ct(4, description)) == phase


@pytest.mark.parametrize(("delay_s", "phase"), [
    (15.0, "arterial"), (35.0, "arterial"), (45.0, "arterial"), (60.0, "venous"),
    (70.0, "venous"), (90.0, "venous"), (300.0, "unknown"), (-120.0, "unknown")])
def test_timing_decides_when_the_description_is_silent(delay_s: float, phase: str) -> None:
    assert classify_phase(timed(5, "Abdomen 3.0 B30f", delay_s)) == phase


def test_timing_breaks_a_tie_and_crosses_midnight() -> None:
    assert classify_phase(timed(5, "ART/PV combined", 70.0)) == "venous"
    assert classify_phase(timed(5, "ART/PV combined", 30.0)) == "arterial"
    assert classify_phase(ct(5, "ART/PV combined")) == "unknown"  # no timing: no guess
    night = ct(5, "Body 2.0", contrast_start_s=23 * 3600 + 59 * 60 + 50, acquisition_s=25.0)
    assert classify_phase(night) == "arterial"  # 35 s after a bolus at 23:59:50


def test_no_contrast_module_means_non_contrast() -> None:
    assert classify_phase(ct(6, "Abdomen 3.0 B30f", contrast_agent=False)) == "non-contrast"
    assert classify_phase(ct(6, "Abdomen 3.0 B30f")) == "unknown"  # agent but no timing
    localizer = ct(1, "Abdomen", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert classify_phase(localizer) == "unknown"


def test_pair_prefers_one_frame_of_reference_same_geometry_thin_slices() -> None:
    thin_art = ct(2, "ART 1.0", slice_thickness_mm=1.0, instances=200)
    thick_art = ct(3, "ART 5.0", slice_thickness_mm=5.0)
    other_for = ct(4, "PV 1.0", slice_thickness_mm=1.0, instances=200,
                   frame_of_reference_uid="1.2.826.0.1.3680043.10.98")
    thin_pv = ct(5, "PV 1.0", slice_thickness_mm=1.0, instances=200)
    thick_pv = ct(6, "PV 5.0", slice_thickness_mm=5.0)
    pair = pair_phases([thick_art, thin_art, other_for, thick_pv, thin_pv])
    assert isinstance(pair, PhasePair)
    assert (pair.arterial, pair.venous) == (thin_art, thin_pv)
    assert pair.same_frame_of_reference
    # without the same-frame venous series, the other frame of reference is still usable
    fallback = pair_phases([thin_art, other_for])
    assert isinstance(fallback, PhasePair) and not fallback.same_frame_of_reference
    missing = pair_phases([thin_art, thick_art])
    assert isinstance(missing, NoMatch)
    assert missing.reason == "no venous phase found among series 2 'ART 1.0', 3 'ART 5.0'"


# ------------------------------------------------------------------ studies


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("routing-cohort") / "cohort"
    generate_cohort(CohortOptions(out=root, patients=12, seed=31, centres=6, size="tiny"))
    return root, json.loads((root / "manifest.json").read_text())


def _summaries(root: Path, patient: dict[str, Any]) -> list[SeriesSummary]:
    summaries = []
    for series in patient["ct"]["series"]:
        files = sorted((root / series["folder"]).glob("*.dcm"))
        header = dcmread(files[0], stop_before_pixels=True)
        summaries.append(SeriesSummary.from_dataset(header, len(files)))
    return summaries


def test_synthetic_cohort_routes_to_its_group(cohort: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = cohort
    expected = {"CRC": "A", "PDAC": "B"}
    seen = set()
    for patient in manifest["patients"]:
        series = _summaries(root, patient)
        clinical = clinical_fields_from_hl7((root / p).read_text() for p in patient["hl7"])
        decision = route(series, clinical)
        assert decision.pipeline == expected[patient["group"]], (patient["index"],
                                                                 decision.reason)
        uids = {s["phase"]: s["series_uid"] for s in patient["ct"]["series"]}
        if decision.pipeline == "B":
            assert decision.pair is not None
            assert decision.series_uids == (uids["arterial"], uids["venous"])
        else:
            assert decision.series_uids == (uids["venous"],)  # portal venous for the liver
        seen.add(patient["centre"])
    assert seen == {c.code for c in CENTRES}


def test_pancreas_protocol_wins_over_a_colorectal_history() -> None:
    series = [timed(2, "Pancreas ART 1.0", 35.0, study_description="CT PANCREAS PROTOCOL"),
              timed(3, "Pancreas PV 1.0", 70.0, study_description="CT PANCREAS PROTOCOL")]
    decision = route(series, CRC)
    assert (decision.pipeline, decision.rule) == ("B", "pdac-pancreas-protocol")


def test_non_ct_study_gets_no_pipeline() -> None:
    mr = ct(1, "T2 HASTE AX", modality="MR", sop_class_uid=MRImageStorage)
    decision = route([mr], CRC)
    assert decision.pipeline is None
    assert "crc-colorectal-pathology (A): no contrast-enhanced axial CT series with >= 10 " \
           "slices covering >= 150 mm among series 1 'T2 HASTE AX'" in decision.reason


def test_single_slice_ct_gets_no_pipeline() -> None:
    decision = route([ct(2, "PV 5mm", instances=1, slice_thickness_mm=5.0)], CRC)
    assert decision.pipeline is None
    assert "no contrast-enhanced axial CT series with >= 10 slices" in decision.reason


def test_single_phase_is_enough_for_a_but_not_for_b() -> None:
    venous_only = [timed(3, "PORTAL VENOUS 2.5mm", 70.0)]
    assert route(venous_only, CRC).pipeline == "A"
    decision = route(venous_only, PDAC)
    assert decision.pipeline is None
    assert "pdac-biphasic-ca19-9 (B): no arterial phase found among series 3 " \
           "'PORTAL VENOUS 2.5mm'" in decision.reason


def test_non_contrast_ct_gets_no_pipeline() -> None:
    native = ct(2, "Abdomen nativ 5.0 B30f", contrast_agent=False)
    decision = route([native], CRC)
    assert decision.pipeline is None
    assert "no contrast-enhanced axial CT series" in decision.reason
    assert "series 2 'Abdomen nativ 5.0 B30f'" in decision.reason


def test_unmatched_clinical_context_is_named() -> None:
    decision = route([timed(2, "ART", 35.0), timed(3, "PV", 70.0)], frozenset())
    assert decision.pipeline is None
    assert "no clinical field pT, pN for the patient" in decision.reason
    assert "no clinical field CA19-9 for the patient" in decision.reason


# ------------------------------------------------------------------ settings


def test_yaml_file_is_the_default_policy() -> None:
    settings = load_routing_settings(REPO / "deploy" / "routing.yaml")
    assert settings.rules == default_rules()
    assert settings == RoutingSettings()


def test_custom_rules_with_tag_conditions() -> None:
    code_rule = RoutingRule(
        name="liver-code", pipeline="A",
        series=SeriesRequirement(min_instances=20, tags=[
            TagCondition(tag="SliceThickness", min=0.5, max=5.0),
            TagCondition(tag="BodyPartExamined", any_of=["ABDOMEN", "LIVER"], missing_ok=True),
            TagCondition(tag="ImageType", equals="PRIMARY")]),
        study_any=[TagCondition(tag="ProcedureCodes", any_of=["LIVMET"])])
    settings = RoutingSettings(rules=[code_rule])
    coded = timed(3, "PV 3mm", 70.0, procedure_codes=frozenset({"LIVMET"}))
    assert route([coded], frozenset(), settings).rule == "liver-code"
    assert route([dataclasses.replace(coded, body_part="")], (), settings).pipeline == "A"
    too_thick = route([dataclasses.replace(coded, slice_thickness_mm=8.0)], (), settings)
    assert "SliceThickness >= 0.5 <= 5" in too_thick.reason
    uncoded = route([dataclasses.replace(coded, procedure_codes=frozenset())], (), settings)
    assert "no study evidence (ProcedureCodes in ['LIVMET'])" in uncoded.reason


def test_bad_configuration_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text("rules:\n  - {name: x, pipeline: C}\n")
    with pytest.raises(ConfigError, match=r"routing\.yaml.*pipeline"):
        load_routing_settings(path)
    path.write_text("rules:\n  - {name: x, pipeline: A, colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        load_routing_settings(path)
    path.write_text("rules:\n  - {name: x, pipeline: A, study_any: [{tag: Modality, "
                    "regex: '(unclosed'}]}\n")
    with pytest.raises(ConfigError, match="does not compile"):
        load_routing_settings(path)
    rule = RoutingSettings().rules[0]
    with pytest.raises(ValidationError, match="frozen"):
        rule.pipeline = "A"


def test_summary_from_header_reads_codes_times_and_orientation() -> None:
    ds = Dataset()
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = "1.2.3.4", "7", "CT"
    ds.SeriesDescription, ds.SliceThickness = "Late Arterial 5mm", "5.0"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.ContrastBolusStartTime, ds.AcquisitionTime = "100000", "100035.5"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "CTPANC", "99LOCAL"
    ds.RequestedProcedureCodeSequence = [item]
    summary = SeriesSummary.from_dataset(ds, 30)
    assert summary.procedure_codes == frozenset({"CTPANC"})
    assert summary.acquisition_s is not None and summary.contrast_start_s is not None
    assert summary.acquisition_s - summary.contrast_start_s == pytest.approx(35.5)
    assert not summary.axial and not summary.contrast_agent
    assert summary.label() == "series 7 'Late Arterial 5mm'"


def test_clinical_fields_from_hl7_diagnosis_segment() -> None:
    message = ("MSH|^~\\&|EHR|H|ONCOPACS|H|20240101||ADT^A08|1|P|2.5\r"
               "PID|1||P1^^^H^MR\rDG1|1||C25.0^Malignant neoplasm of head of pancreas^I10\r")
    assert clinical_fields_from_hl7([message]) == frozenset({"pdac_diagnosis"})


def test_clinical_store_record_names() -> None:
    @dataclasses.dataclass(frozen=True)
    class Value:
        value: object

    @dataclasses.dataclass(frozen=True)
    class Record:  # the shape of app.clinical.ClinicalFields
        t: Value | None = None
        n: Value | None = None
        m: Value | None = None
        cea_ug_l: Value | None = None
        ca19_9_u_ml: Value | None = None

    crc = Record(t=Value("pT3"), n=Value("pN1"), m=Value("cM0"), cea_ug_l=Value(3.1),
                 ca19_9_u_ml=Value(12.0))
    assert clinical_field_names(crc) == frozenset({"pT", "pN", "cM", "CEA", "CA19-9"})
    assert clinical_field_names(Record(t=Value("T2"), ca19_9_u_ml=Value(80.0))) == \
        frozenset({"T", "CA19-9"})
    assert route([timed(2, "ART", 35.0), timed(3, "PV", 70.0)],
                 clinical_field_names(crc)).pipeline == "A"
