"""SEG, SR and result card built on a synthetic CRC and PDAC study.

The segmentation is the cohort's ground truth (``ct/labels.npz``, ascending z) on the
venous series (whose instance 1 is the most cranial slice). Peers: dicom3tools'
dciodvfy, dcmtk's dsrdump, storescu and findscu, Orthanc.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from app.orthanc import Orthanc
from app.results import (
    Finding,
    ModelIdentity,
    ResultsError,
    ResultsSettings,
    SeriesNumbers,
    result_series_numbers,
    slice_spacing_mm,
    sort_slices,
)
from app.results.card import build_card
from app.results.codes import STRUCTURES, Structure
from app.results.seg import build_seg
from app.results.sr import build_sr, structure_volumes_ml
from ml.synth.cohort import CohortOptions, generate_cohort
from tests.tools import dciodvfy, run_dcmtk

SEED = 4404
SEG_MODEL = ModelIdentity("oncopacs-seg-demo", "0.1.0", "a1" * 32, demo=True)
CRC_MODEL = ModelIdentity("crc-liver-metastasis", "0.1.0", "b2" * 32, demo=True)
PDAC_MODEL = ModelIdentity("pdac-tsr", "0.2.0", "c3" * 32, demo=False)
IMAGING_MEASUREMENTS = "126010"
PRIVATE_WARNING = "Unrecognized defined term = <99ONCOPACS>"


@dataclass(frozen=True)
class Built:
    """One patient's inputs and the three result objects, as files."""

    group: str
    ct: Sequence[Dataset]
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    structures: dict[int, Structure]
    finding: Finding
    numbers: SeriesNumbers
    seg: Path
    sr: Path
    card: Path


def _structures(group: str) -> dict[int, Structure]:
    tumour = "colorectal_tumour" if group == "CRC" else "pancreatic_tumour"
    return {1: STRUCTURES["liver"], 2: STRUCTURES["pancreas"], 3: STRUCTURES[tumour],
            5: STRUCTURES["spleen"]}


def _finding(group: str) -> Finding:
    if group == "CRC":
        return Finding("crc_liver_metastasis_risk", 0.734, "high risk", ["ct", "clinical"],
                       ["wsi"], CRC_MODEL)
    return Finding("pdac_tsr", 0.215, "low TSR", ["ct_arterial", "ct_venous"], [], PDAC_MODEL)


def _build(patient: dict[str, Any], root: Path, out: Path) -> Built:
    venous = next(s for s in patient["ct"]["series"] if s["phase"] == "venous")
    # Instance order: cranial first, the reverse of the label volume.
    ct = [pydicom.dcmread(p) for p in sorted((root / venous["folder"]).glob("*.dcm"))]
    grid = np.load(root / patient["ct"]["labels"])
    labels, spacing = grid["labels"], tuple(float(s) for s in grid["spacing_mm"])
    group = patient["group"]
    structures, finding = _structures(group), _finding(group)
    numbers = result_series_numbers([s["series_number"] for s in patient["ct"]["series"]],
                                    ResultsSettings())
    seg = build_seg(ct, labels, structures, SEG_MODEL, numbers.seg)
    volumes = structure_volumes_ml(labels, spacing_mm=slice_spacing_mm(sort_slices(ct)),
                                   structures=structures)
    sr = build_sr(ct, seg, volumes, [finding], observer=finding.model,
                  series_number=numbers.sr, models=[SEG_MODEL])
    card = build_card(ct, labels, structures, volumes, [finding], seg_model=SEG_MODEL,
                      series_number=numbers.card)
    paths = {name: out / f"{group}-{name}.dcm" for name in ("seg", "sr", "card")}
    for name, obj in (("seg", seg), ("sr", sr), ("card", card)):
        obj.save_as(paths[name], enforce_file_format=True)
    return Built(group, ct, labels, (spacing[0], spacing[1], spacing[2]), structures, finding,
                 numbers, paths["seg"], paths["sr"], paths["card"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("results-cohort")
    manifest = generate_cohort(CohortOptions(out=root / "cohort", patients=2, seed=SEED,
                                             size="tiny", workers=1))
    out = tmp_path_factory.mktemp("results")
    by_group = {p["group"]: _build(p, root / "cohort", out) for p in manifest["patients"]}
    assert sorted(by_group) == ["CRC", "PDAC"]
    return by_group


def _groups(sr: Dataset) -> list[Dataset]:
    container = next(i for i in sr.ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS)
    return list(container.ContentSequence)


def _items(group: Dataset, meaning: str) -> list[Dataset]:
    return [i for i in group.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


@pytest.mark.peers
@pytest.mark.parametrize("group", ["CRC", "PDAC"])
def test_every_result_passes_dciodvfy(built: dict[str, Built], group: str) -> None:
    b = built[group]
    for path in (b.seg, b.sr, b.card):
        result = dciodvfy(path)
        assert not result.errors, str(result)
        # The only warnings left: dciodvfy does not know the private coding scheme,
        # which the SR declares in its Coding Scheme Identification Sequence.
        unexpected = [w for w in result.warnings if PRIVATE_WARNING not in w]
        assert not unexpected, "\n".join(unexpected)


@pytest.mark.parametrize("group", ["CRC", "PDAC"])
def test_seg_reads_back_on_the_ct_frames(built: dict[str, Built], group: str) -> None:
    b = built[group]
    seg = hd.seg.segread(b.seg)
    present = [v for v in sorted(b.structures) if np.any(b.labels == v)]
    assert seg.number_of_segments == len(present) == 4
    expected_frames = sum(int(np.any(b.labels == v, axis=(1, 2)).sum()) for v in present)
    assert int(seg.NumberOfFrames) == expected_frames
    ordered = sort_slices(b.ct)
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in ordered],
                                               combine_segments=True)
    for number, value in enumerate(present, start=1):
        np.testing.assert_array_equal(pixels == number, b.labels == value)
    assert seg.StudyInstanceUID == b.ct[0].StudyInstanceUID
    assert seg.PatientID == b.ct[0].PatientID
    assert seg.IssuerOfPatientID == b.ct[0].IssuerOfPatientID
    assert seg.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in b.ct}
    assert int(seg.SeriesNumber) == b.numbers.seg == 103
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == SEG_MODEL.name
    assert algorithm.AlgorithmVersion == SEG_MODEL.version
    assert f"sha256={SEG_MODEL.sha256}" in algorithm.AlgorithmParameters
    ours = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "oncopacs"]
    assert [e.ManufacturerModelName for e in ours] == [SEG_MODEL.name]
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


@pytest.mark.parametrize("group", ["CRC", "PDAC"])
def test_sr_volumes_are_voxel_counts_times_voxel_volume(built: dict[str, Built],
                                                        group: str) -> None:
    b = built[group]
    sr = hd.sr.srread(b.sr)
    voxel_ml = float(np.prod(b.spacing_mm)) / 1000.0
    seg = pydicom.dcmread(b.seg)
    volumes: dict[str, float] = {}
    for group_item in _groups(sr):
        tracking = _items(group_item, "Tracking Identifier")
        volume = _items(group_item, "Volume")
        if volume:
            assert volume[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0] \
                .CodeValue == "ml"
            volumes[tracking[0].TextValue] = float(volume[0].MeasuredValueSequence[0].NumericValue)
            segment = _items(group_item, "Referenced Segment")[0].ReferencedSOPSequence[0]
            assert segment.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    expected = {s.name: float(np.sum(b.labels == v)) * voxel_ml for v, s in b.structures.items()}
    assert volumes.keys() == expected.keys()
    for name, ml in expected.items():
        assert volumes[name] == pytest.approx(ml, abs=1e-5), name
    assert sr.StudyInstanceUID == b.ct[0].StudyInstanceUID
    assert int(sr.SeriesNumber) == b.numbers.sr
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {s.SeriesInstanceUID for s in evidence} == {b.ct[0].SeriesInstanceUID,
                                                       seg.SeriesInstanceUID}
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99ONCOPACS"


@pytest.mark.parametrize("group", ["CRC", "PDAC"])
def test_dsrdump_reads_probability_and_volumes(built: dict[str, Built], group: str) -> None:
    b = built[group]
    dump = run_dcmtk("dsrdump", str(b.sr)).stdout
    probabilities = re.findall(r'NUM:\(,,"Probability of [^"]+"\)="([0-9.]+)" '
                               r'\(\{probability\},UCUM,"probability"\)', dump)
    assert [float(p) for p in probabilities] == [b.finding.probability]
    volumes = [float(v) for v in re.findall(r'NUM:\(,,"Volume"\)="([0-9.]+)" \(ml,UCUM,', dump)]
    voxel_ml = float(np.prod(b.spacing_mm)) / 1000.0
    expected = [float(np.sum(b.labels == v)) * voxel_ml for v in sorted(b.structures)]
    assert volumes == pytest.approx(expected, abs=1e-5)
    assert '(,,"Observer Type")=(121007,DCM,"Device")' in dump
    assert f'"Device Observer Model Name")="{b.finding.model.name}"' in dump


def test_finding_with_missing_inputs_lists_them(built: dict[str, Built]) -> None:
    def coded(group: str, meaning: str) -> list[str]:
        sr = pydicom.dcmread(built[group].sr)
        finding_group = next(g for g in _groups(sr) if _items(g, "Finding")
                             and _items(g, "Finding")[0].ConceptCodeSequence[0]
                             .CodingSchemeDesignator == "99ONCOPACS")
        return [i.ConceptCodeSequence[0].CodeMeaning for i in _items(finding_group, meaning)]

    assert coded("CRC", "Model input missing") == ["Whole Slide Imaging"]
    assert coded("CRC", "Model input used") == ["Computed Tomography", "Clinical Information"]
    assert coded("CRC", "Liver metastasis risk group") == ["High risk"]
    assert coded("PDAC", "Model input missing") == []
    assert coded("PDAC", "Tumour-stroma ratio class") == ["Low tumour-stroma ratio"]
    dump = run_dcmtk("dsrdump", str(built["CRC"].sr)).stdout
    assert '(,,"Model input missing")=(112703,DCM,"Whole Slide Imaging")' in dump


@pytest.mark.parametrize("group", ["CRC", "PDAC"])
def test_card_shows_contours_in_the_study(built: dict[str, Built], group: str) -> None:
    b = built[group]
    card = pydicom.dcmread(b.card)
    assert card.StudyInstanceUID == b.ct[0].StudyInstanceUID
    assert card.PatientID == b.ct[0].PatientID
    assert (card.PhotometricInterpretation, card.SamplesPerPixel) == ("RGB", 3)
    assert int(card.SeriesNumber) == b.numbers.card
    assert card.BurnedInAnnotation == "NO"
    rgb = card.pixel_array
    tumour = next(s for s in b.structures.values() if s.name.endswith("tumour"))
    assert np.all(rgb == tumour.colour_rgb, axis=-1).sum() > 20
    # Text in the demo warning colour appears only when a model is a demo (all are, via
    # the segmentation model).
    assert np.all(rgb == (255, 200, 0), axis=-1).sum() > 100


@pytest.mark.peers
def test_results_join_the_ct_study_in_orthanc(built: dict[str, Built], orthanc: Orthanc,
                                              tmp_path: Path) -> None:
    b = built["CRC"]
    ct_files = [str(p) for p in sorted(Path(b.ct[0].filename).parent.glob("*.dcm"))]
    run_dcmtk("storescu", "-R", "-aec", orthanc.aet, orthanc.host, str(orthanc.dicom_port),
              *ct_files, str(b.seg), str(b.sr), str(b.card))
    answers = tmp_path / "find"
    answers.mkdir()
    study = b.ct[0].StudyInstanceUID
    run_dcmtk("findscu", "-S", "-aec", orthanc.aet, "-k", "QueryRetrieveLevel=SERIES",
              "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID", "-k", "Modality",
              "-k", "SeriesNumber", "-X", "-od", str(answers), orthanc.host,
              str(orthanc.dicom_port))
    found = {int(r.SeriesNumber): r.Modality
             for r in (pydicom.dcmread(p) for p in sorted(answers.glob("rsp*.dcm")))}
    assert found == {3: "CT", b.numbers.seg: "SEG", b.numbers.sr: "SR", b.numbers.card: "OT"}


def test_empty_structures_are_left_out_and_logged(built: dict[str, Built],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    b = built["PDAC"]
    labels = np.where(b.labels == 6, 0, b.labels).astype(np.uint8)
    with caplog.at_level(logging.INFO, logger="app.results.seg"):
        seg = build_seg(b.ct, labels, {1: STRUCTURES["liver"], 6: STRUCTURES["kidneys"]},
                        SEG_MODEL, 200)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver"]
    assert any("kidneys" in r.getMessage() and "no voxels" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ResultsError, match="no structure has voxels"):
        build_seg(b.ct, labels, {6: STRUCTURES["kidneys"]}, SEG_MODEL, 200)


def test_bad_inputs_are_named(built: dict[str, Built]) -> None:
    b = built["CRC"]
    with pytest.raises(ResultsError, match=b.ct[0].SeriesInstanceUID):
        build_seg(b.ct, b.labels[1:], b.structures, SEG_MODEL, 200)
    with pytest.raises(ResultsError, match=r"probability 1\.5"):
        Finding("pdac_tsr", 1.5, "low TSR", ["ct_venous"], [], PDAC_MODEL)
    with pytest.raises(ResultsError, match="'mri'"):
        Finding("pdac_tsr", 0.5, "low TSR", ["mri"], [], PDAC_MODEL)
    with pytest.raises(ResultsError, match="'medium risk'"):
        Finding("crc_liver_metastasis_risk", 0.5, "medium risk", [], [], CRC_MODEL)
    with pytest.raises(ResultsError, match="sha256"):
        ModelIdentity("m", "1", "xyz")
    mixed = [*b.ct[:2], built["PDAC"].ct[0]]
    with pytest.raises(ResultsError, match="2 series"):
        sort_slices(mixed)


def test_series_numbers_are_deterministic() -> None:
    assert result_series_numbers([2, 3], ResultsSettings()) == SeriesNumbers(103, 104, 105)
    assert result_series_numbers([], ResultsSettings()) == SeriesNumbers(100, 101, 102)
    configured = ResultsSettings(series_number_base=900)
    assert result_series_numbers([2, 3, 950], configured) == SeriesNumbers(900, 901, 902)
    with pytest.raises(ResultsError, match="does not fit"):
        result_series_numbers([2**31 - 50], ResultsSettings())
