"""Read the tissue tiles of a whole-slide image with wsidicom, batch by batch.

The same code reads slides for training (from files, :func:`read_tissue_tiles`) and
in the service (over DICOMweb or from C-GET files, ``app.wsi_fetch``), so a model
sees the same tiles at training and at inference.

:func:`tissue_tiles` detects tissue on the slide's coarsest level
(:mod:`ml.tissue_mask`), picks the pyramid level for ``target_mpp``, and reads the
tiles that are mostly tissue, batch by batch; at most ``batch_size`` tiles are held
at a time, never the whole slide.

Pyramid level rule (:func:`ml.tissue_mask.choose_level`): the coarsest level whose
mpp is not coarser than ``target_mpp`` (1 % tolerance); if every level is coarser,
the finest. Tiles of ``tile_px`` at ``target_mpp`` are read as larger regions of
that level and reduced (area average) to ``tile_px``; when even the finest level
is coarser than the target, tiles are read at that level without upsampling and
:attr:`TileBatch.mpp` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from wsidicom import WsiDicom
from wsidicom.geometry import Point

from ml.errors import OncopacsError
from ml.tissue_mask import TissueMask, choose_level, tile_grid, tissue_mask

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]


class WsiReadError(OncopacsError):
    """A slide was opened but cannot be read as asked (no levels, wrong series)."""


class TileSpec(Protocol):
    """Which tiles to read: the fields of ``app.wsi_archive.WsiArchiveSettings`` and
    :class:`Tiles` (see there for their meaning)."""

    @property
    def target_mpp(self) -> float: ...
    @property
    def tile_px(self) -> int: ...
    @property
    def min_tissue_fraction(self) -> float: ...
    @property
    def max_tiles(self) -> int | None: ...
    @property
    def sample_seed(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def mask_max_px(self) -> int: ...


@dataclass(frozen=True)
class Tiles:
    """A plain :class:`TileSpec` (for training and tests).

    Attributes
    ----------
    target_mpp
        Micrometres per pixel of the tiles.
    tile_px
        Tile width and height in pixels.
    min_tissue_fraction
        A tile is read when at least this share of it is tissue in the mask.
    max_tiles
        At most this many tiles, drawn without replacement with ``sample_seed``.
    sample_seed
        Seed of that draw (the same slide and spec give the same tiles).
    batch_size
        Tiles per :class:`TileBatch`.
    mask_max_px
        Largest side of the image the tissue mask is made on.
    """

    target_mpp: float = 4.0
    tile_px: int = 32
    min_tissue_fraction: float = 0.5
    max_tiles: int | None = 128
    sample_seed: int = 0
    batch_size: int = 64
    mask_max_px: int = 2048


@dataclass(frozen=True)
class TileBatch:
    """Tiles read from one slide, with where they came from.

    Attributes
    ----------
    pixels
        ``(B, tile_px, tile_px, 3)`` uint8 RGB.
    location_px
        ``(B, 2)`` level-0 ``x, y`` of each tile's top-left corner, in pixels.
    location_mm
        ``(B, 2)`` the same in millimetres from the top-left of the image (not the
        slide coordinate system).
    size_px
        Width and height of each tile in level-0 pixels.
    tissue_fraction
        ``(B,)`` share of each tile that is tissue in the mask.
    level
        The pyramid level the tiles were read from (wsidicom level number).
    mpp
        Micrometres per pixel of the tiles.
    """

    pixels: U8
    location_px: NDArray[np.int64]
    location_mm: NDArray[np.float64]
    size_px: int
    tissue_fraction: NDArray[np.float64]
    level: int
    mpp: float


def slide_tissue_mask(slide: WsiDicom, settings: TileSpec) -> TissueMask:
    """Tissue mask on the coarsest level (a thumbnail if that is over ``mask_max_px``).

    Raises
    ------
    WsiReadError
        If the slide has no pyramid level.
    """
    levels = slide.levels.levels
    if not levels:
        raise WsiReadError("slide has no pyramid level")
    base_mpp = float(slide.levels.base_level.mpp.width)
    coarsest = max(levels, key=lambda lv: float(lv.mpp.width))
    width, height = coarsest.size.width, coarsest.size.height
    if max(width, height) <= settings.mask_max_px:
        rgb = slide.read_region((0, 0), coarsest.level, (width, height), as_array=True)
        mpp = float(coarsest.mpp.width)
    else:
        rgb = slide.read_thumbnail((settings.mask_max_px, settings.mask_max_px),
                                   as_array=True)
        mpp = base_mpp * slide.size.width / rgb.shape[1]
    return tissue_mask(np.ascontiguousarray(rgb[..., :3]), mpp, base_mpp)


def _read_tile(slide: WsiDicom, level: int, x: int, y: int, read_px: int,
               tile_px: int) -> U8:
    region = slide.read_region((x, y), level, (read_px, read_px), as_array=True)
    rgb = np.ascontiguousarray(region[..., :3])
    if read_px != tile_px:
        reduced = Image.fromarray(rgb, "RGB").resize((tile_px, tile_px), Image.Resampling.BOX)
        rgb = np.asarray(reduced)
    out: U8 = rgb
    return out


def _prefetch(level: Any, level_xy: NDArray[np.int64], read_px: int) -> None:
    """Decode every frame under a batch of tiles into wsidicom's frame cache at once.

    Over DICOMweb this is one frames request per batch instead of one per tile,
    which matters with archives that parse the whole instance per request (Orthanc).
    """
    data = level.default_instance.image_data
    frame_w, frame_h = level.tile_size.width, level.tile_size.height
    points: set[tuple[int, int]] = set()
    for x, y in level_xy.tolist():
        for fy in range(y // frame_h, (y + read_px - 1) // frame_h + 1):
            points.update((fx, fy) for fx in range(x // frame_w, (x + read_px - 1) // frame_w + 1))
    ordered = [Point(fx, fy) for fy, fx in sorted((fy, fx) for fx, fy in points)]
    for _ in data.get_decoded_tiles(ordered, data.default_z, data.default_path):
        pass


def tissue_tiles(slide: WsiDicom, settings: TileSpec) -> Iterator[TileBatch]:
    """Yield the slide's tissue tiles in batches, in raster order.

    Only the mask level and the chosen tiles are read; at most ``batch_size``
    tiles are held at a time.

    Raises
    ------
    WsiReadError
        If the slide has no pyramid level or is smaller than one tile.
    """
    mask = slide_tissue_mask(slide, settings)
    levels = slide.levels.levels
    base = slide.levels.base_level
    base_mpp = float(base.mpp.width)
    chosen = levels[choose_level([float(lv.mpp.width) for lv in levels], settings.target_mpp)]
    grid = tile_grid(mask, (chosen.size.width, chosen.size.height),
                     float(chosen.mpp.width) / base_mpp, settings.tile_px,
                     float(chosen.mpp.width), settings.target_mpp)
    if grid.candidates == 0:
        raise WsiReadError(f"slide level {chosen.level} ({chosen.size.width} x "
                           f"{chosen.size.height} px) is smaller than one "
                           f"{grid.read_px} px tile")
    keep = np.flatnonzero(grid.coverage >= settings.min_tissue_fraction)
    tissue_count = keep.size
    if settings.max_tiles is not None and keep.size > settings.max_tiles:
        rng = np.random.default_rng(settings.sample_seed)
        keep = np.sort(rng.choice(keep, settings.max_tiles, replace=False))
    logger.info("slide %s: level %d, %d candidate tiles, %d with tissue, %d to read",
                slide.uids.series_instance if slide.uids else "?", chosen.level,
                grid.candidates, tissue_count, keep.size)
    spacing_mm = float(base.pixel_spacing.width)
    tile_mpp = float(chosen.mpp.width) * grid.read_px / settings.tile_px
    for start in range(0, keep.size, settings.batch_size):
        index = keep[start:start + settings.batch_size]
        _prefetch(chosen, grid.level_xy[index], grid.read_px)
        pixels = np.stack([_read_tile(slide, chosen.level, int(grid.level_xy[i, 0]),
                                      int(grid.level_xy[i, 1]), grid.read_px,
                                      settings.tile_px) for i in index])
        location = grid.base_xy[index]
        yield TileBatch(pixels=pixels, location_px=location,
                        location_mm=location.astype(np.float64) * spacing_mm,
                        size_px=grid.base_px, tissue_fraction=grid.coverage[index],
                        level=chosen.level, mpp=tile_mpp)


def read_tissue_tiles(folder: Path, spec: TileSpec) -> Iterator[TileBatch]:
    """Open the DICOM WSI series in ``folder`` (all its files) and yield its tissue tiles.

    Raises
    ------
    WsiReadError
        If the folder holds no readable slide, or the slide cannot be tiled.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise WsiReadError(f"no files in slide folder {folder}")
    try:
        slide = WsiDicom.open(files)
    except Exception as exc:  # wsidicom raises many types for unreadable input
        raise WsiReadError(f"cannot open a slide from {folder}: {exc}") from exc
    with slide:
        yield from tissue_tiles(slide, spec)
