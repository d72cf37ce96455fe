"""Fetching a patient's H&E slide from a real Orthanc: C-FIND, DICOMweb, C-GET, tissue tiles.

A tiny synthetic cohort (patient 0 CRC with a slide, patient 1 PDAC) is generated
once; patient 0's slide and CT are stored in the session's Orthanc. Tiles read
over DICOMweb and after C-GET are compared with ``WsiDicom.open`` on the source
files, and tissue detection with the generator's own region labels.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from wsidicom import WsiDicom

from app.orthanc import Orthanc
from app.wsi_fetch import (
    SlideRef,
    TileBatch,
    WsiArchiveError,
    WsiArchiveSettings,
    cget_series,
    choose_slide,
    find_slides,
    open_slide,
    tissue_tiles,
)
from ml.synth.centres import centres
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.synth.latent import sample_patient
from ml.synth.push import cstore_files
from ml.synth.sizes import size
from ml.synth.tissue import SlideLayout, plan_slide, region_window
from ml.tissue_mask import (
    TissueMask,
    choose_level,
    otsu_threshold,
    tile_coverage,
    tissue_mask,
)
from tests.tools import free_port

SEED = 6021
TILE_PX = 64
BASE_MPP = 4.0  # tiny slides: 1024 px at 4, 8 and 16 mpp, 256 px frames


@dataclass(frozen=True)
class Cohort:
    root: Path
    patient: dict[str, Any]  # manifest entry of the CRC patient
    wsi_files: list[Path]
    layout: SlideLayout


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    root = tmp_path_factory.mktemp("wsi-cohort")
    manifest = generate_cohort(CohortOptions(out=root, patients=2, seed=SEED, size="tiny"))
    crc = [p for p in manifest["patients"] if p["wsi"] is not None]
    assert len(crc) == 1 and len(manifest["patients"]) == 2
    patient = crc[0]
    files = sorted((root / patient["wsi"]["folder"]).glob("*.dcm"))
    layout = plan_slide(sample_patient(SEED, patient["index"], centres(3)), size("tiny"), SEED)
    return Cohort(root, patient, files, layout)


@pytest.fixture(scope="module")
def archive(orthanc: Orthanc, cohort: Cohort) -> Orthanc:
    """The session's Orthanc holding the CRC patient's slide and arterial CT series."""
    ct = cohort.patient["ct"]["series"][0]
    ct_files = sorted((cohort.root / ct["folder"]).glob("*.dcm"))
    report = cstore_files(cohort.wsi_files + ct_files, orthanc.host, orthanc.dicom_port,
                          orthanc.aet)
    assert report.failed == [] and report.sent == len(cohort.wsi_files) + len(ct_files)
    return orthanc


def local_settings(**changes: Any) -> WsiArchiveSettings:
    """Tile settings for the tiny slide; the archive fields are unused placeholders."""
    values: dict[str, Any] = {"port": 104, "called_aet": "UNUSED", "target_mpp": BASE_MPP,
                              "tile_px": TILE_PX, "max_tiles": None, "batch_size": 16,
                              "timeout_s": 10.0}
    values.update(changes)
    return WsiArchiveSettings(**values)


def settings_for(server: Orthanc, **changes: Any) -> WsiArchiveSettings:
    """Tile settings with ``server`` as the archive (DICOM and DICOMweb)."""
    archive = {"host": server.host, "port": server.dicom_port, "called_aet": server.aet,
               "dicomweb_url": server.dicomweb_url}
    return local_settings(**{**archive, **changes})


def slide_ref(cohort: Cohort) -> SlideRef:
    wsi = cohort.patient["wsi"]
    return SlideRef(study_uid=wsi["study_uid"], series_uid=wsi["series_uid"], acquired=None,
                    series_description="", study_description="", instances=None)


def read_all(slide: WsiDicom, settings: WsiArchiveSettings) -> TileBatch:
    """Every batch of tissue_tiles joined into one (fine for a tiny slide)."""
    batches = list(tissue_tiles(slide, settings))
    assert batches, "no tissue tile at all"
    assert all(len(b.pixels) <= settings.batch_size for b in batches)
    first = batches[0]
    return TileBatch(pixels=np.concatenate([b.pixels for b in batches]),
                     location_px=np.concatenate([b.location_px for b in batches]),
                     location_mm=np.concatenate([b.location_mm for b in batches]),
                     size_px=first.size_px,
                     tissue_fraction=np.concatenate([b.tissue_fraction for b in batches]),
                     level=first.level, mpp=first.mpp)


def assert_same_tiles(got: TileBatch, want: TileBatch) -> None:
    np.testing.assert_array_equal(got.location_px, want.location_px)
    np.testing.assert_array_equal(got.pixels, want.pixels)
    assert (got.level, got.mpp, got.size_px) == (want.level, want.mpp, want.size_px)


@pytest.fixture(scope="module")
def local_tiles(cohort: Cohort) -> TileBatch:
    """The tissue tiles of the source files, read with ``WsiDicom.open``."""
    with WsiDicom.open(cohort.wsi_files) as slide:
        return read_all(slide, local_settings())


# ------------------------------------------------------------------ C-FIND


@pytest.mark.peers
@pytest.mark.parametrize("relational", [True, False], ids=["series-level", "study-then-series"])
def test_find_slides_finds_the_patients_slide(archive: Orthanc, cohort: Cohort,
                                              relational: bool) -> None:
    settings = settings_for(archive, relational_series_query=relational)
    refs = find_slides(settings, cohort.patient["patient_id"], cohort.patient["issuer"])
    wsi = cohort.patient["wsi"]
    assert [(r.study_uid, r.series_uid) for r in refs] == [(wsi["study_uid"], wsi["series_uid"])]
    ref = refs[0]
    scanned = dcmread(cohort.wsi_files[0], stop_before_pixels=True)
    assert ref.acquired == dt.datetime.strptime(
        f"{scanned.SeriesDate}{scanned.SeriesTime}", "%Y%m%d%H%M%S")
    assert ref.instances == len(cohort.wsi_files)
    assert ref.is_he(settings.he_pattern)
    surgery = dt.date.fromisoformat(cohort.patient["surgery_date"])
    assert choose_slide(settings, refs, on_or_after=surgery) == ref
    assert choose_slide(settings, refs) == ref
    assert choose_slide(settings, refs, on_or_after=ref.acquired.date() + dt.timedelta(1)) \
        is None


@pytest.mark.peers
def test_find_slides_unknown_patient_or_issuer_is_empty(archive: Orthanc,
                                                        cohort: Cohort) -> None:
    settings = settings_for(archive)
    assert find_slides(settings, "NO-SUCH-PATIENT", cohort.patient["issuer"]) == []
    assert find_slides(settings, cohort.patient["patient_id"], "SomeOtherIssuer") == []
    # without issuer matching the slide is found whatever issuer is given
    loose = settings_for(archive, match_issuer=False)
    assert len(find_slides(loose, cohort.patient["patient_id"], "SomeOtherIssuer")) == 1


def test_choose_slide_prefers_the_latest_he_slide() -> None:
    settings = WsiArchiveSettings(port=104, called_aet="PACS")

    def ref(uid: str, when: dt.datetime | None, description: str) -> SlideRef:
        return SlideRef("1.2", uid, when, description, "", 1)

    old = ref("1.2.1", dt.datetime(2024, 1, 5), "H&E block A1")
    new = ref("1.2.2", dt.datetime(2024, 3, 1), "HE resection")
    ihc = ref("1.2.3", dt.datetime(2024, 4, 1), "CD3 immunohistochemistry")
    undated = ref("1.2.4", None, "Haematoxylin and eosin")
    assert choose_slide(settings, [old, ihc, new, undated]) == new
    assert choose_slide(settings, [old, undated], on_or_after=dt.date(2024, 2, 1)) is None
    assert choose_slide(settings, [undated]) == undated
    assert choose_slide(settings, [ihc]) is None


def test_find_slides_unreachable_archive_names_the_peer() -> None:
    port = free_port()
    settings = WsiArchiveSettings(port=port, called_aet="NOWHERE", calling_aet="ME_HERE",
                                  timeout_s=5.0)
    with pytest.raises(WsiArchiveError,
                       match=rf"C-FIND.*127\.0\.0\.1:{port}.*NOWHERE.*ME_HERE"):
        find_slides(settings, "P1", None)


# ------------------------------------------------------------------ open_slide


@pytest.mark.peers
def test_open_slide_over_dicomweb_gives_the_local_tiles(archive: Orthanc, cohort: Cohort,
                                                        local_tiles: TileBatch,
                                                        tmp_path: Path) -> None:
    settings = settings_for(archive)
    with open_slide(settings, slide_ref(cohort), tmp_path / "cget") as slide:
        assert_same_tiles(read_all(slide, settings), local_tiles)
    assert not (tmp_path / "cget").exists(), "DICOMweb worked, so nothing was retrieved"


@pytest.mark.peers
def test_open_slide_by_cget_gives_the_local_tiles(archive: Orthanc, cohort: Cohort,
                                                  local_tiles: TileBatch,
                                                  tmp_path: Path) -> None:
    settings = settings_for(archive, dicomweb_url=None)
    with open_slide(settings, slide_ref(cohort), tmp_path) as slide:
        assert_same_tiles(read_all(slide, settings), local_tiles)
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in tmp_path.iterdir()}
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in cohort.wsi_files}
    assert stored == sent
    for path in tmp_path.iterdir():  # frames arrive as stored: JPEG Baseline, not transcoded
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            "1.2.840.10008.1.2.4.50"


@pytest.mark.peers
def test_open_slide_falls_back_to_cget_when_dicomweb_fails(archive: Orthanc, cohort: Cohort,
                                                           local_tiles: TileBatch,
                                                           tmp_path: Path) -> None:
    settings = settings_for(archive, dicomweb_url=f"{archive.http_url}/no-such-dicomweb")
    with open_slide(settings, slide_ref(cohort), tmp_path) as slide:
        assert_same_tiles(read_all(slide, settings), local_tiles)
    assert len(list(tmp_path.glob("*.dcm"))) == len(cohort.wsi_files)


@pytest.mark.peers
def test_cget_of_an_unknown_series_is_an_error(archive: Orthanc, tmp_path: Path) -> None:
    ref = SlideRef("1.2.3.4", "1.2.3.4.5", None, "", "", None)
    with pytest.raises(WsiArchiveError, match=r"series 1\.2\.3\.4\.5.*127\.0\.0\.1"):
        cget_series(settings_for(archive), ref, tmp_path)


def test_open_slide_unreachable_archive_names_the_peer(cohort: Cohort, tmp_path: Path) -> None:
    port = free_port()
    settings = WsiArchiveSettings(port=port, called_aet="NOWHERE", timeout_s=5.0,
                                  dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web",
                                  dicomweb_attempts=1)
    web = re.escape(str(settings.dicomweb_url))
    with pytest.raises(WsiArchiveError,
                       match=rf"DICOMweb at {web} failed.*C-GET .*127\.0\.0\.1:{port}.*NOWHERE"):
        open_slide(settings, slide_ref(cohort), tmp_path)


# ------------------------------------------------------------------ only tissue, few frames


def truth_fraction(layout: SlideLayout, x: int, y: int, side: int) -> float:
    """Share of a level-0 square that the generator labelled tissue."""
    return float((region_window(layout, y, y + side, x, x + side) > 0).mean())


def test_tissue_tiles_are_tissue_and_skip_the_background(cohort: Cohort,
                                                         local_tiles: TileBatch) -> None:
    layout, side = cohort.layout, local_tiles.size_px
    assert side == TILE_PX and local_tiles.level == 0 and local_tiles.mpp == BASE_MPP
    chosen = {tuple(xy) for xy in local_tiles.location_px.tolist()}
    truth = {(x, y): truth_fraction(layout, x, y, side)
             for y in range(0, layout.extent_px, side) for x in range(0, layout.extent_px, side)}
    got = np.array([truth[xy] for xy in chosen])
    assert got.min() >= 0.25 and got.mean() >= 0.85, "a chosen tile is mostly background"
    assert all(truth[xy] > 0 for xy in chosen), "a tile of pure background was read"
    full = [xy for xy, share in truth.items() if share >= 0.95]
    missed = [xy for xy in full if xy not in chosen]
    assert len(missed) <= 0.05 * len(full), f"{len(missed)} of {len(full)} tissue tiles missed"
    assert len(chosen) < 0.8 * len(truth), "the white background was not skipped"
    glass = np.array([241, 240, 243])
    white = (np.abs(local_tiles.pixels.astype(int) - glass).max(axis=-1) <= 12).mean(axis=(1, 2))
    assert white.mean() < 0.15
    np.testing.assert_allclose(local_tiles.location_mm, local_tiles.location_px * BASE_MPP / 1000)


@pytest.mark.parametrize(("target_mpp", "level", "step_px", "mpp"),
                         [(8.0, 1, 2 * TILE_PX, 8.0),  # level 1 as it is
                          (6.0, 0, 96, 6.0),  # 96 px of level 0 reduced to 64
                          (2.0, 0, TILE_PX, 4.0)])  # finer than the base: base, not enlarged
def test_tissue_tiles_level_and_scale(cohort: Cohort, target_mpp: float, level: int,
                                      step_px: int, mpp: float) -> None:
    settings = local_settings(target_mpp=target_mpp)
    with WsiDicom.open(cohort.wsi_files) as slide:
        tiles = read_all(slide, settings)
        assert (tiles.level, tiles.mpp, tiles.size_px) == (level, mpp, step_px)
        assert tiles.pixels.shape[1:] == (TILE_PX, TILE_PX, 3)
        assert not (tiles.location_px % step_px).any()
        for pixels, (x, y) in zip(tiles.pixels[:8], tiles.location_px[:8], strict=False):
            region = slide.read_region((int(x), int(y)), 0, (step_px, step_px), as_array=True)
            coarse = np.asarray(Image.fromarray(region).resize((16, 16), Image.Resampling.BOX))
            tile = pixels.reshape(16, TILE_PX // 16, 16, TILE_PX // 16, 3).mean(axis=(1, 3))
            assert np.abs(tile - coarse).mean() < 3, "the tile is not the level-0 region"
    truth = [truth_fraction(cohort.layout, int(x), int(y), step_px) for x, y in tiles.location_px]
    assert np.mean(truth) >= 0.85


class FrameCounter:
    """A requests session hook: which (instance, frame) pairs and bytes came over HTTP."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str]] = []
        self.frame_requests = 0
        self.bytes = 0

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.bytes += len(response.content)
        parts = response.url.split("/")
        if "frames" in parts:
            at = parts.index("frames")
            self.frame_requests += 1
            for frame in parts[at + 1].split(","):
                self.frames.append((parts[at - 1], frame))


@pytest.fixture
def counted() -> Iterator[tuple[requests.Session, FrameCounter]]:
    counter = FrameCounter()
    with requests.Session() as session:
        session.hooks["response"].append(counter)
        yield session, counter


@pytest.mark.peers
@pytest.mark.parametrize("max_tiles", [2, None])
def test_few_tiles_fetch_few_frames(archive: Orthanc, cohort: Cohort, tmp_path: Path,
                                    counted: tuple[requests.Session, FrameCounter],
                                    max_tiles: int | None) -> None:
    session, counter = counted
    level0 = str(dcmread(cohort.wsi_files[0], stop_before_pixels=True).SOPInstanceUID)
    frames0 = int(dcmread(cohort.wsi_files[0], stop_before_pixels=True).NumberOfFrames)
    settings = settings_for(archive, max_tiles=max_tiles)
    with open_slide(settings, slide_ref(cohort), tmp_path, session=session) as slide:
        tiles = read_all(slide, settings)
    level0_frames = {f for uid, f in counter.frames if uid == level0}
    whole_slide_bytes = sum(p.stat().st_size for p in cohort.wsi_files)
    if max_tiles is not None:
        assert len(tiles.pixels) == max_tiles
        # one frame probed at open, at most four under each 64 px tile
        assert len(level0_frames) <= 1 + 4 * max_tiles < frames0
        assert counter.bytes < 0.6 * whole_slide_bytes
    else:
        assert len(level0_frames) >= frames0 // 2  # every tissue frame, the counter counts
    # frames are fetched per batch, not per tile: one probe per instance at open, the
    # coarsest level for the mask, then one request per batch
    batches = -(-len(tiles.pixels) // settings.batch_size)
    assert counter.frame_requests <= len(cohort.wsi_files) + 1 + batches
    assert not any(tmp_path.iterdir()), "DICOMweb worked, so nothing was retrieved"


def test_max_tiles_sample_is_deterministic(cohort: Cohort, local_tiles: TileBatch) -> None:
    settings = local_settings(max_tiles=10, batch_size=4)
    with WsiDicom.open(cohort.wsi_files) as slide:
        first, again = read_all(slide, settings), read_all(slide, settings)
        other = read_all(slide, settings.model_copy(update={"sample_seed": 1}))
    assert_same_tiles(first, again)
    assert len(first.pixels) == 10
    assert {tuple(xy) for xy in first.location_px.tolist()} <= \
        {tuple(xy) for xy in local_tiles.location_px.tolist()}
    assert not np.array_equal(first.location_px, other.location_px)
    order = first.location_px[:, 1] * 10**6 + first.location_px[:, 0]
    assert (np.diff(order) > 0).all(), "tiles are not in raster order"


# ------------------------------------------------------------------ units


def test_settings_are_frozen_and_strict() -> None:
    settings = WsiArchiveSettings(port=104, called_aet="PACS")
    with pytest.raises(pydantic.ValidationError):
        WsiArchiveSettings.model_validate({"port": 104, "called_aet": "PACS", "tile_size": 3})
    with pytest.raises(pydantic.ValidationError, match="AE title"):
        WsiArchiveSettings(port=104, called_aet="A" * 17)
    with pytest.raises(pydantic.ValidationError, match="he_pattern"):
        WsiArchiveSettings(port=104, called_aet="PACS", he_pattern="(")
    with pytest.raises(pydantic.ValidationError):
        setattr(settings, "tile_px", 512)  # noqa: B010 - the assignment is the test


def test_choose_level_rule() -> None:
    mpps = [0.25, 0.5, 1.0, 2.0, 4.0]
    assert choose_level(mpps, 2.0) == 3
    assert choose_level(mpps, 2.01) == 3  # within 1 %
    assert choose_level(mpps, 3.0) == 3  # not coarser than the target
    assert choose_level(mpps, 0.1) == 0  # every level coarser: the finest
    assert choose_level(list(reversed(mpps)), 1.5) == 2


def test_otsu_threshold_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)])
    assert 0.2 < otsu_threshold(np.clip(values, 0, 1)) < 0.45


def test_tissue_mask_on_a_drawn_slide() -> None:
    rgb = np.full((200, 300, 3), (240, 240, 242), dtype=np.uint8)
    rgb[50:150, 40:140] = (200, 120, 180)  # a square of tissue
    rgb[90:110, 80:100] = (236, 226, 232)  # pale lumen inside it: filled
    rgb[10, 250] = (200, 100, 180)  # a speck: dropped
    mask = tissue_mask(rgb, mpp=16.0, base_mpp=4.0)
    want = np.zeros((200, 300), dtype=bool)
    want[50:150, 40:140] = True
    assert mask.mask[90:110, 80:100].all(), "the lumen was not filled"
    assert not mask.mask[5:15, 245:255].any(), "the speck was kept"
    assert (mask.mask != want).sum() <= 4  # the opening may round the four corners
    assert mask.downsample == (4.0, 4.0)
    blank = tissue_mask(np.full((50, 50, 3), 240, dtype=np.uint8), mpp=16.0, base_mpp=4.0)
    assert not blank.mask.any()


def test_tile_coverage_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = TissueMask(rng.random((40, 60)) < 0.4, mpp=8.0, downsample=(2.0, 2.0),
                      threshold=0.1)
    boxes = np.array([[0, 0, 20, 20], [10, 6, 40, 30], [100, 60, 1, 1], [118, 78, 2, 2]],
                     dtype=np.int64)
    got = tile_coverage(mask, boxes)
    for (x, y, w, h), share in zip(boxes, got, strict=True):
        cols = [c for c in range(60) if x <= (c + 0.5) * 2 < x + w]
        rows = [r for r in range(40) if y <= (r + 0.5) * 2 < y + h]
        if not cols:
            cols = [int((x + w / 2) / 2)]
        if not rows:
            rows = [int((y + h / 2) / 2)]
        assert share == pytest.approx(mask.mask[np.ix_(rows, cols)].mean())
