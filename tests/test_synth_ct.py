"""The synthetic two-phase CT study: valid DICOM, consistent geometry, the planted signal."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ml.errors import SynthError
from ml.synth.centres import centres
from ml.synth.ct import CtStudyRecord, write_ct_study
from ml.synth.latent import PatientSpec, patient_rng, sample_patient
from ml.synth.phantom import (
    FOCUS,
    LABELS,
    TUMOUR,
    build_phantom,
    ct_grid,
    render_phase,
)
from ml.synth.sizes import Size, size
from tests.tools import dciodvfy

SEED = 20240


@dataclass(frozen=True)
class Study:
    spec: PatientSpec
    record: CtStudyRecord


@dataclass(frozen=True)
class Series:
    hu: np.ndarray
    datasets: Sequence[pydicom.Dataset]


def _load(folder: Path) -> Series:
    """A series as a (z, y, x) HU volume sorted by z, with its datasets in the same order."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope)
                   + float(ds.RescaleIntercept) for ds in datasets])
    return Series(hu, datasets)


def _labels(record: CtStudyRecord) -> dict[str, np.ndarray]:
    with np.load(record.labels_path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def tiny() -> Size:
    return size("tiny")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, tiny: Size) -> dict[str, Study]:
    out: dict[str, Study] = {}
    for group, index in (("CRC", 0), ("PDAC", 1)):
        spec = sample_patient(SEED, index, centres(3))
        assert spec.group == group
        folder = tmp_path_factory.mktemp(group.lower())
        out[group] = Study(spec, write_ct_study(spec, tiny, SEED, folder))
    return out


def _files(record: CtStudyRecord) -> list[Path]:
    return sorted(p for series in record.series for p in series.folder.glob("*.dcm"))


@pytest.mark.peers
def test_every_file_passes_dciodvfy(studies: dict[str, Study]) -> None:
    files = [p for study in studies.values() for p in _files(study.record)]
    assert len(files) == sum(s.instances for st in studies.values() for s in st.record.series)
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(dciodvfy, files))
    bad = [str(r) for r in reports if r.errors or r.warnings]
    assert not bad, "\n".join(bad[:5]) + "\n" + "\n".join(
        w for r in reports[:1] for w in r.warnings)


@pytest.mark.parametrize("group", ["CRC", "PDAC"])
def test_series_form_one_volume_on_the_label_grid(studies: dict[str, Study], group: str) -> None:
    record = studies[group].record
    labels = _labels(record)
    assert [s.phase for s in record.series] == ["arterial", "venous"]
    assert [s.series_number for s in record.series] == [2, 3]
    assert list(labels["names"]) == sorted(LABELS, key=LABELS.__getitem__)
    loaded = {s.phase: _load(s.folder) for s in record.series}
    for series in record.series:
        vol = loaded[series.phase]
        first = vol.datasets[0]
        assert vol.hu.shape == labels["labels"].shape
        assert len(vol.datasets) == series.instances
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in vol.datasets])
        np.testing.assert_allclose(np.diff(z), float(first.SliceThickness))
        assert float(first.SliceThickness) == series.slice_thickness_mm
        np.testing.assert_allclose(labels["spacing_mm"],
                                   [series.slice_thickness_mm, *map(float, first.PixelSpacing)])
        ipp = [float(v) for v in first.ImagePositionPatient]
        np.testing.assert_allclose(labels["origin_mm"], [ipp[2], ipp[1], ipp[0]])
        for ds in vol.datasets:
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.FrameOfReferenceUID == record.frame_of_reference_uid
            assert ds.StudyInstanceUID == record.study_uid
            assert ds.SeriesInstanceUID == series.series_uid
            assert ds.AccessionNumber == record.accession
            assert ds.SeriesDescription == series.description
            assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
    times = {phase: vol.datasets[0].AcquisitionTime for phase, vol in loaded.items()}
    assert times["arterial"] < times["venous"]
    bolus = loaded["arterial"].datasets[0].ContrastBolusStartTime
    assert bolus < times["arterial"]


def test_aorta_is_brighter_in_the_arterial_phase(studies: dict[str, Study]) -> None:
    for study in studies.values():
        labels = _labels(study.record)["labels"]
        arterial, venous = (_load(s.folder).hu for s in study.record.series)
        # Below the portal vein the only labelled vessels are the aorta and iliac arteries.
        lower = np.zeros_like(labels, dtype=bool)
        lower[: labels.shape[0] // 2] = True
        aorta = lower & (labels == LABELS["vessels"])
        assert aorta.sum() > 10
        assert arterial[aorta].mean() > venous[aorta].mean() + 80.0


def test_pdac_tumour_mean_is_the_latent_value(studies: dict[str, Study]) -> None:
    study = studies["PDAC"]
    tumour = _labels(study.record)["labels"] == LABELS["tumour"]
    assert tumour.sum() > 0
    expected = {"arterial": study.spec.pdac.tumour_hu_arterial,
                "venous": study.spec.pdac.tumour_hu_venous}
    for series in study.record.series:
        mean = _load(series.folder).hu[tumour].mean() - study.spec.centre.hu_shift
        assert mean == pytest.approx(expected[series.phase], abs=1.0)


def test_phantom_renders_the_planted_signal_exactly(tiny: Size) -> None:
    for index in range(4):
        spec = sample_patient(SEED, index, centres(3))
        grid = ct_grid(tiny, spec.centre)
        phantom = build_phantom(spec, grid, patient_rng(SEED, index, "ct"))
        liver = phantom.labels == LABELS["liver"]
        tumour = phantom.tissue == TUMOUR
        if spec.group == "CRC":
            assert phantom.texture_hu is not None
            assert phantom.texture_hu[liver].std() == pytest.approx(
                spec.crc.liver_texture_hu, rel=1e-4)
            assert np.any(phantom.tissue == FOCUS) == (spec.crc.liver_foci > 0)
        else:
            rng = patient_rng(SEED, 99, "ct")
            for phase, value in (("arterial", spec.pdac.tumour_hu_arterial),
                                 ("venous", spec.pdac.tumour_hu_venous)):
                hu = render_phase(phantom, phase, spec.centre, rng)
                assert hu[tumour].mean() - spec.centre.hu_shift == pytest.approx(value, abs=1e-3)


def test_crc_liver_texture_grows_with_the_latent(tmp_path: Path, tiny: Size) -> None:
    """The texture is the same field in both phases and the noise is not, so the
    covariance of the two phases over the liver estimates the texture's variance."""
    truth, measured = [], []
    for index in (0, 2, 4, 6, 8, 10):
        spec = sample_patient(SEED, index, centres(3))
        record = write_ct_study(spec, tiny, SEED, tmp_path / str(index))
        liver = _labels(record)["labels"] == LABELS["liver"]
        arterial, venous = (_load(s.folder).hu[liver] for s in record.series)
        cov = float(np.mean((arterial - arterial.mean()) * (venous - venous.mean())))
        truth.append(spec.crc.liver_texture_hu)
        measured.append(np.sqrt(max(cov, 0.0)))
    truth_a, measured_a = np.array(truth), np.array(measured)
    assert np.ptp(truth_a) > 5.0, truth
    assert np.corrcoef(truth_a, measured_a)[0, 1] > 0.9, (truth, measured)
    np.testing.assert_allclose(measured_a, truth_a, atol=2.0)


def test_same_seed_same_bytes_other_seed_other_pixels(
        studies: dict[str, Study], tmp_path: Path, tiny: Size) -> None:
    first = studies["CRC"]
    again = write_ct_study(first.spec, tiny, SEED, tmp_path / "again")
    assert again == CtStudyRecord(
        first.record.study_uid, first.record.accession, first.record.frame_of_reference_uid,
        tuple(replace(s, folder=tmp_path / "again" / "ct" / s.phase)
              for s in first.record.series),
        tmp_path / "again" / "ct" / "labels.npz")
    old_root = first.record.labels_path.parent
    for path in [*_files(first.record), first.record.labels_path]:
        twin = tmp_path / "again" / "ct" / path.relative_to(old_root)
        assert twin.read_bytes() == path.read_bytes(), path
    other = write_ct_study(first.spec, tiny, SEED + 1, tmp_path / "other")
    a = pydicom.dcmread(first.record.series[0].folder / "IM00010.dcm")
    b = pydicom.dcmread(other.series[0].folder / "IM00010.dcm")
    assert a.PixelData != b.PixelData
    assert other.study_uid != first.record.study_uid


def test_bad_requests_name_the_problem(tiny: Size) -> None:
    spec = sample_patient(SEED, 1, centres(3))
    squashed = Size("squashed", 64, 380.0, 10.0, 1.0, 1024, 256, 3, 4.0)
    with pytest.raises(SynthError, match="slices"):
        ct_grid(squashed, spec.centre)
    phantom = build_phantom(spec, ct_grid(tiny, spec.centre), patient_rng(SEED, 1, "ct"))
    with pytest.raises(SynthError, match="delayed"):
        render_phase(phantom, "delayed", spec.centre, None)
