"""The synthetic H&E slide: valid DICOM WSI, readable by wsidicom, deterministic, and
carrying the planted stroma signal."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from scipy.stats import spearmanr
from wsidicom import WsiDicom

from ml.errors import SynthError
from ml.synth.centres import centres
from ml.synth.latent import PatientSpec, sample_patient
from ml.synth.sizes import size
from ml.synth.tissue import TUMOUR, plan_slide, region_labels, render_window
from ml.synth.wsi import WsiRecord, halve, write_wsi
from tests.tools import dciodvfy

SEED = 11
TINY = size("tiny")


def crc(index: int, seed: int = SEED) -> PatientSpec:
    spec = sample_patient(seed, index, centres(3))
    assert spec.group == "CRC"
    return spec


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[PatientSpec, WsiRecord]:
    spec = crc(0)
    return spec, write_wsi(spec, TINY, SEED, tmp_path_factory.mktemp("p0"))


def level_files(record: WsiRecord) -> list[Path]:
    return [record.folder / f"level-{k}.dcm" for k in range(record.levels)]


@pytest.mark.peers
def test_every_level_passes_dciodvfy(slide: tuple[PatientSpec, WsiRecord]) -> None:
    _, record = slide
    for path in level_files(record):
        report = dciodvfy(path)
        assert not report.errors, str(report)


def test_record_and_files(slide: tuple[PatientSpec, WsiRecord]) -> None:
    spec, record = slide
    assert record.levels == TINY.wsi_levels == record.instances
    assert record.base_px == (TINY.wsi_base_px, TINY.wsi_base_px)
    assert record.base_mpp == TINY.wsi_base_mpp
    assert sorted(p.name for p in record.folder.iterdir()) == [p.name for p in
                                                               level_files(record)]
    datasets = [pydicom.dcmread(p) for p in level_files(record)]
    for level, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert ds.Modality == "SM" and ds.DimensionOrganizationType == "TILED_FULL"
        assert ds.StudyInstanceUID == record.study_uid
        assert ds.SeriesInstanceUID == record.series_uid
        assert ds.AccessionNumber == record.accession
        assert ds.PatientID == spec.patient_id and ds.IssuerOfPatientID == spec.issuer
        assert ds.PatientName == spec.name and ds.PatientSex == spec.sex
        assert ds.PatientBirthDate == spec.birth_date.strftime("%Y%m%d")
        assert ds.Manufacturer == spec.centre.wsi_manufacturer
        assert ds.ManufacturerModelName == spec.centre.wsi_model_name
        assert ds.TotalPixelMatrixColumns == TINY.wsi_base_px >> level
        tiles = -(-ds.TotalPixelMatrixColumns // TINY.wsi_tile_px)
        assert ds.NumberOfFrames == tiles * tiles
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert float(spacing[0]) == pytest.approx(TINY.wsi_base_mpp * 2**level / 1000)
        stains = {item.ConceptCodeSequence[0].CodeValue
                  for step in ds.SpecimenDescriptionSequence[0].SpecimenPreparationSequence
                  for item in step.SpecimenPreparationStepContentItemSequence
                  if item.ConceptNameCodeSequence[0].CodeValue == "424361007"}
        assert stains == {"12710003", "36879007"}  # hematoxylin, water soluble eosin
    assert len({ds.SOPInstanceUID for ds in datasets}) == record.levels
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.ContainerIdentifier for ds in datasets}) == 1
    study_date = dt.datetime.strptime(datasets[0].StudyDate, "%Y%m%d").date()
    assert 1 <= (study_date - spec.surgery_date).days <= 10


def test_wsidicom_reads_every_level(slide: tuple[PatientSpec, WsiRecord]) -> None:
    _, record = slide
    with WsiDicom.open(record.folder) as wsi:
        assert len(wsi.levels) == TINY.wsi_levels
        for k, level in enumerate(wsi.levels):
            extent = TINY.wsi_base_px >> k
            assert (level.size.width, level.size.height) == (extent, extent)
            assert level.mpp.width == pytest.approx(TINY.wsi_base_mpp * 2**k)
            tile = wsi.read_tile(level.level, (0, 0))
            assert tile.size == (TINY.wsi_tile_px, TINY.wsi_tile_px)
            region = wsi.read_region((extent // 4, extent // 4), level.level, (64, 48))
            assert region.size == (64, 48)


def test_tissue_covers_about_half_the_slide(slide: tuple[PatientSpec, WsiRecord]) -> None:
    _, record = slide
    with WsiDicom.open(record.folder) as wsi:
        level = wsi.levels[-1]
        pixels = np.asarray(wsi.read_region((0, 0), level.level,
                                            (level.size.width, level.size.height)))
    tissue = pixels[..., :3].astype(np.int16).min(axis=-1) < 215
    assert 0.3 <= tissue.mean() <= 0.7


def test_tiles_render_the_same_in_any_window() -> None:
    layout = plan_slide(crc(2), TINY, SEED)
    whole = render_window(layout, 0, 512, 0, 512)
    part = render_window(layout, 100, 300, 200, 450)
    np.testing.assert_array_equal(whole[100:300, 200:450], part)
    with pytest.raises(SynthError, match="outside"):
        render_window(layout, 0, 2000, 0, 10)


def test_stroma_share_is_the_latent_stroma_fraction(tmp_path: Path) -> None:
    estimated, latent = [], []
    for index in range(0, 20, 2):
        spec = crc(index)
        record = write_wsi(spec, TINY, SEED, tmp_path / str(index))
        with WsiDicom.open(record.folder) as wsi:
            level = wsi.levels[-1]
            pixels = np.asarray(wsi.read_region((0, 0), level.level, (
                level.size.width, level.size.height)))[..., :3].astype(np.float64)
        labels = region_labels(plan_slide(spec, TINY, SEED),
                               TINY.wsi_base_px // pixels.shape[0])
        tumour = ndimage.binary_erosion(labels == TUMOUR, iterations=2)
        assert tumour.sum() > 500
        # Eosin-pink stroma is red over blue, haematoxylin-purple epithelium blue over red.
        estimated.append(float((pixels[..., 0] - pixels[..., 2])[tumour].mean()))
        latent.append(spec.crc.stroma_fraction)
    rho = spearmanr(estimated, latent).statistic
    assert rho > 0.8, (rho, estimated, latent)


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path: Path) -> None:
    spec = crc(4)
    first = write_wsi(spec, TINY, SEED, tmp_path / "a")
    again = write_wsi(spec, TINY, SEED, tmp_path / "b")
    assert (again.study_uid, again.series_uid) == (first.study_uid, first.series_uid), \
        "synth_uid must give the same UID for the same (seed, patient, role)"
    for a, b in zip(level_files(first), level_files(again), strict=True):
        assert a.read_bytes() == b.read_bytes()
    other = write_wsi(crc(4, seed=SEED + 1), TINY, SEED + 1, tmp_path / "c")
    assert other.study_uid != first.study_uid
    pixels_a = pydicom.dcmread(level_files(first)[0]).pixel_array
    pixels_c = pydicom.dcmread(level_files(other)[0]).pixel_array
    assert pixels_a.shape == pixels_c.shape
    assert np.abs(pixels_a.astype(int) - pixels_c.astype(int)).mean() > 5


def test_only_crc_patients_have_a_slide(tmp_path: Path) -> None:
    pdac = sample_patient(SEED, 1, centres(3))
    with pytest.raises(SynthError, match="CRC"):
        write_wsi(pdac, TINY, SEED, tmp_path)


def test_halve_is_the_rounded_two_by_two_mean() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    blocks = pixels.reshape(3, 2, 4, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    np.testing.assert_array_equal(halve(pixels), ((blocks + 2) >> 2).astype(np.uint8))
