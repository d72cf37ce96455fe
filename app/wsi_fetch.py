"""Fetch a patient's H&E whole-slide image from the archive, reading only tissue tiles.

Three steps, each a plain function:

1. :func:`find_slides` asks the archive (C-FIND, Study Root) for the patient's
   slide microscopy (``SM``) series; :func:`choose_slide` picks the most recent
   H&E slide, optionally taken on or after a date.
2. :func:`open_slide` opens that series with wsidicom: over DICOMweb
   (``WsiDicom.open_web``), which fetches metadata and then only the frames that
   are read; or, when no DICOMweb URL is configured or DICOMweb fails, by C-GET of
   the series into a folder and ``WsiDicom.open`` on it.
3. :func:`tissue_tiles` (:mod:`ml.wsi_tiles`, shared with model training) reads
   the tiles that are mostly tissue, batch by batch, at ``target_mpp``.

Logs carry UIDs and counts only, never patient identifiers.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient
from numpy.typing import NDArray
from wsidicom import WsiDicom, WsiDicomWebClient

from app.wsi_archive import (
    HE_PATTERN,
    WSI_ERRORS,
    SlideRef,
    WsiArchiveError,
    WsiArchiveSettings,
    cget_series,
    choose_slide,
    find_slides,
)
from ml.wsi_tiles import TileBatch, WsiReadError, slide_tissue_mask, tissue_tiles

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
