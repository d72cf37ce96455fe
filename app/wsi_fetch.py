"""Fetch a patient's H&E whole-slide image from the archive, reading only tissue tiles.

Three steps, each a plain function:

1. :func:`find_slides` asks the archive (C-FIND, Study Root) for the patient's
   slide microscopy (``SM``) series; :func:`choose_slide` picks the most recent
   H&E slide, optionally taken on or after a date.
2. :func:`open_slide` opens that series with wsidicom: over DICOMweb
   (``WsiDicom.open_web``), which fetches metadata and then only the frames that
   are read; or, when no DICOMweb URL is configured or DICOMweb fails, by C-GET of
   the series into a folder and ``WsiDicom.open`` on it.
3. :func:`tissue_tiles` detects tissue on the slide's coarsest level
   (:mod:`app.tissue_mask`), picks the pyramid level for ``target_mpp``, and
   reads the tiles that are mostly tissue, batch by batch.

Pyramid level rule (:func:`app.tissue_mask.choose_level`): the coarsest level whose
mpp is not coarser than ``target_mpp`` (1 % tolerance); if every level is coarser,
the finest. Tiles of ``tile_px`` at ``target_mpp`` are read as larger regions of
that level and reduced (area average) to ``tile_px``; when even the finest level
is coarser than the target, tiles are read at that level without upsampling and
:attr:`TileBatch.mpp` says so.

Logs carry UIDs and counts only, never patient identifiers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient
from numpy.typing import NDArray
from PIL import Image
from wsidicom import WsiDicom, WsiDicomWebClient
from wsidicom.geometry import Point

from app.tissue_mask import TissueMask, choose_level, tile_grid, tissue_mask

__all__ = [
    "SlideRef", "TileBatch", "WsiArchiveError", "WsiArchiveSettings", "WsiReadError",
    "cget_series", "choose_slide", "find_slides", "open_slide", "slide_tissue_mask", "tissue_tiles",
]

from app.wsi_archive import (
    HE_PATTERN,
    WSI_ERRORS,
    SlideRef,
    WsiArchiveError,
    WsiArchiveSettings,
    WsiReadError,
    cget_series,
    choose_slide,
    find_slides,
)

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]

__all__ = [
    "HE_PATTERN",
    "WSI_ERRORS",
    "SlideRef",
    "TileBatch",
    "WsiArchiveError",
    "WsiArchiveSettings",
    "WsiReadError",
    "cget_series",
    "choose_slide",
    "find_slides",
    "open_slide",
    "slide_tissue_mask",
    "tissue_tiles",
]


def _open_web(settings: WsiArchiveSettings, ref: SlideRef,
              session: requests.Session | None) -> WsiDicom:
    assert settings.dicomweb_url is not None  # noqa: S101 - checked by the caller
    web = DICOMwebClient(settings.dicomweb_url, session=session)
    attempts = settings.dicomweb_attempts
    web.set_http_retry_params(retry=attempts > 1, max_attempts=attempts)
    client = WsiDicomWebClient(web)
    with warnings.catch_warnings():
        # the metadata carry the ICC profile as a bulk data URI that wsidicom does not
        # follow; pydicom also logs this, once per instance
        warnings.filterwarnings("ignore", message="No bulk data URI handler")
        return WsiDicom.open_web(client, ref.study_uid, ref.series_uid)


def _open_retrieved(settings: WsiArchiveSettings, ref: SlideRef, folder: Path,
                    web_failure: str) -> WsiDicom:
    """C-GET the series into ``folder`` and open the files."""
    try:
        files = cget_series(settings, ref, folder)
    except WsiArchiveError as exc:
        if web_failure:
            raise WsiArchiveError(f"{web_failure}, then {exc}") from exc
        raise
    try:
        return WsiDicom.open(files)
    except WSI_ERRORS as exc:
        raise WsiReadError(f"series {ref.series_uid}: the {len(files)} instances retrieved "
                           f"into {folder} are not a readable slide: {exc}") from exc


def open_slide(settings: WsiArchiveSettings, ref: SlideRef, folder: Path, *,
               session: requests.Session | None = None) -> WsiDicom:
    """Open a slide over DICOMweb, or by C-GET into ``folder`` when that is not possible.

    Over DICOMweb only metadata is fetched now; frames are fetched when read.
    C-GET (used when ``settings.dicomweb_url`` is ``None`` or DICOMweb fails)
    stores every instance of the series in ``folder`` first. The caller closes the
    slide and owns ``folder``.

    Parameters
    ----------
    settings
        The archive.
    ref
        The series to open.
    folder
        Where C-GET stores the instances (created if missing).
    session
        The HTTP session for DICOMweb (authentication, connection reuse, hooks).

    Returns
    -------
    wsidicom.WsiDicom
        The opened slide.

    Raises
    ------
    WsiArchiveError
        If C-GET is needed and the archive cannot be reached or fails the retrieve.
    WsiReadError
        If what was opened is not the series asked for, or has no pyramid.
    """
    slide: WsiDicom | None = None
    web_failure = ""
    if settings.dicomweb_url is not None:
        try:
            slide = _open_web(settings, ref, session)
            logger.info("opened series %s over DICOMweb", ref.series_uid)
        except WSI_ERRORS as exc:
            web_failure = f"DICOMweb at {settings.dicomweb_url} failed ({type(exc).__name__})"
            logger.warning("series %s: %s; using C-GET", ref.series_uid, web_failure)
    if slide is None:
        slide = _open_retrieved(settings, ref, folder, web_failure)
    uids = slide.uids
    if uids is None or str(uids.series_instance) != ref.series_uid:
        found = None if uids is None else uids.series_instance
        slide.close()
        raise WsiReadError(f"asked for series {ref.series_uid}, opened series {found}")
    return slide


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


def slide_tissue_mask(slide: WsiDicom, settings: WsiArchiveSettings) -> TissueMask:
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


def tissue_tiles(slide: WsiDicom, settings: WsiArchiveSettings) -> Iterator[TileBatch]:
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
