"""Model A's tile attention as a FRACTIONAL SEG on the H&E slide."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from app.results import ModelIdentity, ResultsError
from app.results.heatmap import attention_grid, build_attention_seg
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.wsi_tiles import Tiles, read_tissue_tiles
from tests.tools import dciodvfy

MODEL = ModelIdentity("crc-liver-metastasis", "1.0.0", "ab" * 32, demo=True)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slide")
    generate_cohort(CohortOptions(out=out, patients=1, seed=77, size="tiny", centres=1))
    return next(out.glob("patients/*/wsi"))


def test_grid_puts_each_tile_in_its_cell_scaled_to_the_largest() -> None:
    grid = attention_grid((100, 130), 32, [[0, 0], [64, 32], [96, 64]], [0.2, 0.5, 0.0])
    assert grid.shape == (4, 5)
    assert grid[0, 0] == pytest.approx(0.4) and grid[1, 2] == pytest.approx(1.0)
    assert grid[2, 3] == 0.0 and grid.sum() == pytest.approx(1.4)
    with pytest.raises(ResultsError, match="outside"):
        attention_grid((100, 130), 32, [[160, 0]], [1.0])
    with pytest.raises(ResultsError, match="non-negative"):
        attention_grid((100, 130), 32, [[0, 0]], [-1.0])
    with pytest.raises(ResultsError, match="equal"):
        attention_grid((100, 130), 32, [[0, 0]], [1.0, 2.0])


def test_attention_seg_on_the_slide_validates_and_reads_back(slide: Path,
                                                             tmp_path: Path) -> None:
    batches = list(read_tissue_tiles(slide, Tiles(target_mpp=8.0, tile_px=16, max_tiles=40)))
    xy = np.concatenate([b.location_px for b in batches])
    weights = np.linspace(0.1, 1.0, len(xy))
    base = pydicom.dcmread(slide / "level-0.dcm", stop_before_pixels=True)
    seg = build_attention_seg(base, xy, batches[0].size_px, weights, MODEL, 901)
    path = tmp_path / "attention.dcm"
    seg.save_as(path)
    report = dciodvfy(path)
    assert report.errors == [], report.errors
    assert seg.StudyInstanceUID == base.StudyInstanceUID
    assert seg.PatientID == base.PatientID
    back = hd.seg.segread(path)
    assert back.SegmentationType == "FRACTIONAL"
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == base.SeriesInstanceUID
    total = back.get_total_pixel_matrix(combine_segments=False)
    cell = batches[0].size_px
    last = xy[-1]
    assert total[last[1] // cell, last[0] // cell, 0] == pytest.approx(1.0, abs=1 / 255)
    assert total[..., 0].max() == pytest.approx(1.0, abs=1 / 255)
    assert np.count_nonzero(total[..., 0]) == len(xy)
