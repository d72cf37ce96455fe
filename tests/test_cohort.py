"""A whole synthetic cohort: manifest, validation, geometry, determinism, real peers."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from wsidicom import WsiDicom, WsiDicomWebClient

from app.orthanc import Orthanc
from ml.synth.cohort import CohortOptions, cohort_files, generate_cohort, load_manifest
from ml.synth.push import cstore_files
from tests.tools import dciodvfy, run_dcmtk

SEED = 5
PATIENTS = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("cohort") / "c"
    manifest = generate_cohort(CohortOptions(out=out, patients=PATIENTS, seed=SEED, centres=3,
                                             size="tiny", workers=2))
    return out, manifest


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_ties_patients_to_files_and_uids(cohort: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = cohort
    assert load_manifest(root) == manifest
    assert [p["group"] for p in manifest["patients"]] == ["CRC", "PDAC"] * 3
    assert {p["centre"] for p in manifest["patients"]} == {"C1", "C2", "C3"}
    for patient in manifest["patients"]:
        phases = [s["phase"] for s in patient["ct"]["series"]]
        assert phases == ["arterial", "venous"]
        for series in patient["ct"]["series"]:
            files = sorted((root / series["folder"]).glob("*.dcm"))
            assert len(files) == series["instances"] > 1
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            assert ds.StudyInstanceUID == patient["ct"]["study_uid"]
            assert ds.SeriesInstanceUID == series["series_uid"]
            assert ds.PatientID == patient["patient_id"]
            assert ds.IssuerOfPatientID == patient["issuer"]
        assert (patient["wsi"] is not None) == (patient["group"] == "CRC")
        assert len(patient["hl7"]) == (3 if patient["group"] == "CRC" else 2)
        assert all((root / h).is_file() for h in patient["hl7"])
        assert 0.0 < patient["labels"]["probability"] < 1.0


@pytest.mark.peers
def test_every_dicom_object_passes_dciodvfy(cohort: tuple[Path, dict[str, Any]]) -> None:
    dicom, _ = cohort_files(cohort[1], cohort[0])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(dciodvfy, dicom))
    failed = [str(r) for r in results if r.errors]
    assert not failed, "\n".join(failed[:5])


def test_ct_series_load_as_volumes_on_the_label_grid(
        cohort: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = cohort
    for patient in manifest["patients"]:
        grid = np.load(root / patient["ct"]["labels"])
        for series in patient["ct"]["series"]:
            datasets = [pydicom.dcmread(p) for p in (root / series["folder"]).glob("*.dcm")]
            volume = hd.get_volume_from_series(datasets)
            assert volume.shape == grid["labels"].shape
            np.testing.assert_allclose(sorted(volume.spacing), sorted(grid["spacing_mm"]))
            # Instance 1 is the most cranial slice: the volume runs towards -z.
            z_first = volume.position[2]
            z_last = z_first - (volume.shape[0] - 1) * grid["spacing_mm"][0]
            assert z_last == pytest.approx(grid["origin_mm"][0])
            assert series["slice_thickness_mm"] == pytest.approx(grid["spacing_mm"][0])


def test_same_seed_same_bytes_whatever_the_workers(
        cohort: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_cohort(CohortOptions(out=again, patients=PATIENTS, seed=SEED, centres=3,
                                  size="tiny", workers=1))
    assert _digests(again) == _digests(cohort[0])


@pytest.mark.peers
def test_storescu_study_is_found_by_findscu(cohort: tuple[Path, dict[str, Any]],
                                            orthanc: Orthanc, tmp_path: Path) -> None:
    root, manifest = cohort
    patient = manifest["patients"][1]
    folders = [str(root / s["folder"]) for s in patient["ct"]["series"]]
    run_dcmtk("storescu", "-R", "+sd", "-aec", orthanc.aet, orthanc.host,
              str(orthanc.dicom_port), *folders)
    answers = tmp_path / "find"
    answers.mkdir()
    run_dcmtk("findscu", "-S", "-aec", orthanc.aet, "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"PatientID={patient['patient_id']}", "-k", "StudyInstanceUID",
              "-k", "NumberOfStudyRelatedInstances", "-k", "ModalitiesInStudy",
              "-X", "-od", str(answers), orthanc.host, str(orthanc.dicom_port))
    found = [pydicom.dcmread(p) for p in sorted(answers.glob("rsp*.dcm"))]
    assert [f.StudyInstanceUID for f in found] == [patient["ct"]["study_uid"]]
    expected = sum(s["instances"] for s in patient["ct"]["series"])
    assert int(found[0].NumberOfStudyRelatedInstances) == expected
    assert found[0].ModalitiesInStudy == "CT"


@pytest.mark.peers
def test_wsi_opens_through_orthanc_dicomweb_like_from_files(
        cohort: tuple[Path, dict[str, Any]], orthanc: Orthanc) -> None:
    root, manifest = cohort
    wsi = manifest["patients"][0]["wsi"]
    files = sorted((root / wsi["folder"]).glob("*.dcm"))
    report = cstore_files(files, orthanc.host, orthanc.dicom_port, orthanc.aet)
    assert report.sent == len(files) and not report.failed
    client = WsiDicomWebClient.create_client(orthanc.dicomweb_url)
    with WsiDicom.open(root / wsi["folder"]) as local, \
            WsiDicom.open_web(client, wsi["study_uid"], wsi["series_uid"]) as web:
        assert len(web.levels) == len(local.levels) == wsi["levels"]
        for level in range(wsi["levels"]):
            assert web.levels[level].size == local.levels[level].size
            a = np.asarray(web.read_tile(level, (0, 0)))
            b = np.asarray(local.read_tile(level, (0, 0)))
            np.testing.assert_array_equal(a, b)
        assert web.levels[0].mpp.width == pytest.approx(wsi["base_mpp"])


@pytest.mark.slow
@pytest.mark.peers
def test_default_size_patient_validates(tmp_path: Path) -> None:
    """One CRC patient at the default (scanner-like) size: every object validates."""
    manifest = generate_cohort(CohortOptions(out=tmp_path / "c", patients=1, seed=SEED,
                                             size="default"))
    dicom, _ = cohort_files(manifest, tmp_path / "c")
    assert len(dicom) > 100
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(dciodvfy, dicom))
    failed = [str(r) for r in results if r.errors]
    assert not failed, "\n".join(failed[:5])
    with WsiDicom.open(tmp_path / "c" / manifest["patients"][0]["wsi"]["folder"]) as slide:
        assert slide.levels[0].size.width == 6144 and len(slide.levels) == 4
