"""The slide archive: find a patient's slide microscopy series (C-FIND) and
retrieve a series (C-GET) when DICOMweb is not available.

Settings, references and errors shared with :mod:`app.wsi_fetch`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    VLWholeSlideMicroscopyImageStorage,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from wsidicom.errors import (
    WsiDicomError,
    WsiDicomMatchError,
    WsiDicomNotFoundError,
    WsiDicomNotSupportedError,
    WsiDicomUidDuplicateError,
)

from ml.errors import PeerError

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]
WSI_ERRORS = (requests.RequestException, WsiDicomError, WsiDicomMatchError,
              WsiDicomNotFoundError, WsiDicomNotSupportedError, WsiDicomUidDuplicateError)
HE_PATTERN = r"H\s*&\s*E|\bHE\b|ha?ematoxylin"


class WsiArchiveError(PeerError):
    """The archive cannot be reached, refused the association, or failed a C-FIND/C-GET."""


def _check_aet(value: str) -> str:
    if not 0 < len(value.strip()) <= 16 or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 characters without a backslash")
    return value


class WsiArchiveSettings(BaseModel):
    """Where the slides are and how to read them.

    Attributes
    ----------
    host, port, called_aet, calling_aet
        The archive's DICOM service (C-FIND, C-GET) and this application's AE title.
    dicomweb_url
        The archive's DICOMweb root (``http://pacs/dicom-web``); ``None`` to use C-GET.
    dicomweb_attempts
        Attempts per DICOMweb request (dicomweb-client's exponential back-off, 1 s,
        2 s ...) on connection errors and HTTP 408/429/503/504.
    timeout_s
        ACSE, DIMSE and network timeout of DICOM associations.
    match_issuer
        Send IssuerOfPatientID in C-FIND and drop answers that carry another issuer.
    relational_series_query
        Ask at SERIES level with the patient's keys first (one C-FIND); archives that
        refuse it are asked at STUDY level, then SERIES level per study. ``False``
        always uses the hierarchical pair.
    he_pattern
        Regular expression (case-insensitive) that marks a series or study
        description as H&E.
    target_mpp
        Micrometres per pixel of the tiles (see the module's pyramid level rule).
    tile_px
        Tile width and height in pixels.
    min_tissue_fraction
        A tile is read when at least this share of it is tissue in the mask.
    max_tiles
        At most this many tiles per slide, drawn without replacement with
        ``sample_seed`` (the same slide and settings give the same tiles).
    batch_size
        Tiles per :class:`TileBatch`.
    mask_max_px
        The tissue mask is made on the coarsest level, or on a thumbnail of at most
        this size when that level is larger.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    called_aet: str
    calling_aet: str = "ONCOPACS"
    dicomweb_url: str | None = None
    dicomweb_attempts: int = Field(default=3, ge=1, le=10)
    timeout_s: float = Field(default=30.0, gt=0)
    match_issuer: bool = True
    relational_series_query: bool = True
    he_pattern: str = HE_PATTERN
    target_mpp: float = Field(default=2.0, gt=0)
    tile_px: int = Field(default=224, ge=16, le=4096)
    min_tissue_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    max_tiles: int | None = Field(default=2000, ge=1)
    sample_seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=32, ge=1, le=4096)
    mask_max_px: int = Field(default=2048, ge=64)

    @field_validator("called_aet", "calling_aet")
    @classmethod
    def _aet(cls, value: str) -> str:
        return _check_aet(value)

    @field_validator("he_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"he_pattern {value!r} is not a regular expression: {exc}") \
                from exc
        return value

    @property
    def peer(self) -> str:
        """``host:port (called AE X, calling AE Y)``, for error messages."""
        return (f"{self.host}:{self.port} (called AE {self.called_aet}, "
                f"calling AE {self.calling_aet})")


@dataclass(frozen=True)
class SlideRef:
    """One slide microscopy series in the archive."""

    study_uid: str
    series_uid: str
    acquired: dt.datetime | None
    series_description: str
    study_description: str
    instances: int | None

    def is_he(self, pattern: str = HE_PATTERN) -> bool:
        """Whether the series or study description names an H&E stain."""
        text = f"{self.series_description} {self.study_description}"
        return re.search(pattern, text, flags=re.IGNORECASE) is not None


def _parse_when(date: str, time: str) -> dt.datetime | None:
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    digits = (time.strip().split(".")[0] + "000000")[:6]
    try:
        day = dt.datetime.strptime(date, "%Y%m%d")
        clock = dt.datetime.strptime(digits, "%H%M%S").time() if digits.isdigit() \
            else dt.time()
    except ValueError:
        return None
    return dt.datetime.combine(day.date(), clock)


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R Information Model - FIND
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Q/R Information Model - GET
PENDING = (0xFF00, 0xFF01)
SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDate",
               "SeriesTime", "SeriesDescription", "NumberOfSeriesRelatedInstances")
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription",
              "ModalitiesInStudy")
SM_TRANSFER_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000Lossless, JPEG2000,
                        ExplicitVRLittleEndian, ImplicitVRLittleEndian)
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
Row = dict[str, str]


class _QueryRefused(Exception):
    """The archive answered a C-FIND with a failure status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"0x{status:04X}")
        self.status = status


def _associate(settings: WsiArchiveSettings, ae: AE, what: str, *,
               ext_neg: list[Any] | None = None,
               evt_handlers: list[Any] | None = None) -> Association:
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
    ae.connection_timeout = settings.timeout_s
    assoc = ae.associate(settings.host, settings.port, ae_title=settings.called_aet,
                         ext_neg=ext_neg, evt_handlers=evt_handlers)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise WsiArchiveError(f"{what}: association rejected by archive {settings.peer}")
    raise WsiArchiveError(f"{what}: no association with archive {settings.peer} "
                          "(unreachable, or it aborted)")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _query(assoc: Association, settings: WsiArchiveSettings, level: str,
           keys: dict[str, str]) -> list[Row]:
    """One C-FIND; the identifiers of its pending responses as keyword -> text.

    Raises
    ------
    _QueryRefused
        If the archive answers with a failure status.
    WsiArchiveError
        If the association drops or times out.
    """
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    rows: list[Row] = []
    for status, identifier in assoc.send_c_find(query,
                                                STUDY_ROOT_FIND):
        if status is None or "Status" not in status:
            raise WsiArchiveError(f"C-FIND at {level} level: no answer from archive "
                                  f"{settings.peer} (association aborted or timed out)")
        code = int(status.Status)
        if code == 0x0000:
            break
        if code not in PENDING:
            raise _QueryRefused(code)
        if identifier is not None:
            rows.append({k: _text(identifier.get(k)).strip() for k in keys})
    return rows


def _same_patient(row: Row, patient_id: str, issuer: str | None) -> bool:
    """False when the answer names another patient or issuer (blank keys match)."""
    if row.get("PatientID") and row["PatientID"] != patient_id:
        return False
    return not (issuer and row.get("IssuerOfPatientID") and row["IssuerOfPatientID"] != issuer)


def _hierarchical(assoc: Association, settings: WsiArchiveSettings,
                  patient: dict[str, str]) -> list[Row]:
    """STUDY-level C-FIND for the patient, then SERIES level (Modality SM) per study."""
    rows: list[Row] = []
    studies = _query(assoc, settings, "STUDY", {**patient, **dict.fromkeys(STUDY_KEYS, "")})
    for study in studies:
        modalities = study.get("ModalitiesInStudy", "")
        if not _same_patient(study, patient["PatientID"], patient.get("IssuerOfPatientID")) \
                or (modalities and "SM" not in modalities.split("\\")):
            continue
        keys = {**dict.fromkeys(SERIES_KEYS, ""), "StudyInstanceUID": study["StudyInstanceUID"],
                "Modality": "SM"}
        for row in _query(assoc, settings, "SERIES", keys):
            rows.append({**study, **{k: v for k, v in row.items() if v}})
    return rows


def _find_sm_series(settings: WsiArchiveSettings, patient_id: str,
                    issuer: str | None) -> list[Row]:
    ae = AE(ae_title=settings.calling_aet)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = _associate(settings, ae, "C-FIND of slide series")
    patient = {"PatientID": patient_id}
    if issuer:
        patient["IssuerOfPatientID"] = issuer
    try:
        rows: list[Row] | None = None
        if settings.relational_series_query:
            keys = {**patient, **dict.fromkeys(SERIES_KEYS, ""), "Modality": "SM",
                    "StudyDate": "", "StudyTime": "", "StudyDescription": ""}
            try:
                rows = _query(assoc, settings, "SERIES", keys)
            except _QueryRefused as exc:
                logger.info("archive refused a SERIES-level C-FIND by patient (%s); "
                            "asking per study", exc)
        if rows is None:
            rows = _hierarchical(assoc, settings, patient)
    except _QueryRefused as exc:
        raise WsiArchiveError(f"C-FIND failed with status {exc} at archive "
                              f"{settings.peer}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    return [r for r in rows if _same_patient(r, patient_id, issuer)
            and r.get("Modality", "SM") in ("SM", "")
            and r.get("StudyInstanceUID") and r.get("SeriesInstanceUID")]


def find_slides(settings: WsiArchiveSettings, patient_id: str,
                issuer: str | None = None) -> list[SlideRef]:
    """The patient's slide microscopy series in the archive, most recent first.

    Parameters
    ----------
    settings
        The archive.
    patient_id, issuer
        PatientID and IssuerOfPatientID; the issuer is sent and checked when
        ``settings.match_issuer`` is true and it is given.

    Returns
    -------
    list[SlideRef]
        Every SM series of the patient (empty for an unknown patient), newest first;
        series without a date come last.

    Raises
    ------
    WsiArchiveError
        If the archive cannot be reached, rejects the association, or fails the
        query (the message names host:port and both AE titles).
    """
    rows = _find_sm_series(settings, patient_id, issuer if settings.match_issuer else None)
    refs: dict[str, SlideRef] = {}
    for row in rows:
        when = _parse_when(row.get("SeriesDate", ""), row.get("SeriesTime", "")) or \
            _parse_when(row.get("StudyDate", ""), row.get("StudyTime", ""))
        count = row.get("NumberOfSeriesRelatedInstances", "")
        refs[row["SeriesInstanceUID"]] = SlideRef(
            study_uid=row["StudyInstanceUID"], series_uid=row["SeriesInstanceUID"],
            acquired=when, series_description=row.get("SeriesDescription", ""),
            study_description=row.get("StudyDescription", ""),
            instances=int(count) if count.strip().isdigit() else None)
    ordered = sorted(refs.values(), key=lambda r: (r.acquired is not None,
                                                   r.acquired or dt.datetime.min),
                     reverse=True)
    logger.info("C-FIND found %d SM series in %d studies", len(ordered),
                len({r.study_uid for r in ordered}))
    return ordered


def choose_slide(settings: WsiArchiveSettings, refs: list[SlideRef],
                 on_or_after: dt.date | None = None) -> SlideRef | None:
    """The most recent H&E slide, acquired on or after ``on_or_after`` when given.

    Slides without an acquisition date are only chosen when no date is asked for
    and no dated H&E slide exists. ``None`` when no slide qualifies.
    """
    he = [r for r in refs if r.is_he(settings.he_pattern)]
    if on_or_after is not None:
        he = [r for r in he if r.acquired is not None and r.acquired.date() >= on_or_after]
    if not he:
        return None
    return max(he, key=lambda r: (r.acquired is not None, r.acquired or dt.datetime.min))


def _store(event: evt.Event, folder: Path, received: list[Path]) -> int:
    """C-STORE handler of the C-GET association: write the instance; never raise."""
    uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    name = uid if UID_RE.fullmatch(uid) else f"instance-{len(received) + 1}"
    path = folder / f"{name}.dcm"
    part = folder / f".{name}.part"
    try:
        part.write_bytes(event.encoded_dataset())
        part.replace(path)
    except OSError as exc:
        logger.warning("cannot store retrieved instance %s in %s: %s", uid, folder, exc)
        return 0xA700
    except Exception as exc:  # a handler must answer with a status, whatever happens
        logger.warning("cannot encode retrieved instance %s: %s", uid, exc)
        return 0xC210
    received.append(path)
    return 0x0000


def cget_series(settings: WsiArchiveSettings, ref: SlideRef, folder: Path) -> list[Path]:
    """C-GET every instance of a slide series into ``folder``; return the files.

    The association proposes VL Whole Slide Microscopy Image Storage with JPEG
    Baseline, JPEG 2000 and uncompressed transfer syntaxes, each in its own
    context with the SCP role, so the archive can send the stored frames as they are.

    Raises
    ------
    WsiArchiveError
        If the archive cannot be reached, rejects the association, ends the retrieve
        with a failure or warning status, or sends no instance.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=settings.calling_aet)
    ae.add_requested_context(STUDY_ROOT_GET)
    for syntax in SM_TRANSFER_SYNTAXES:
        ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, [syntax])
    received: list[Path] = []
    what = f"C-GET of series {ref.series_uid}"
    assoc = _associate(settings, ae, what,
                       ext_neg=[build_role(VLWholeSlideMicroscopyImageStorage, scp_role=True)],
                       evt_handlers=[(evt.EVT_C_STORE, _store, [folder, received])])
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = ref.study_uid
    query.SeriesInstanceUID = ref.series_uid
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_get(query, STUDY_ROOT_GET):
            if status is None or "Status" not in status:
                break
            if int(status.Status) not in PENDING:
                final = status
                break
    finally:
        if assoc.is_established:
            assoc.release()
    what = f"{what} from archive {settings.peer}"
    if final is None:
        raise WsiArchiveError(f"{what}: no final answer (association aborted or timed out) "
                              f"after {len(received)} instances")
    code, failed = int(final.Status), int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if code != 0x0000 or failed:
        raise WsiArchiveError(f"{what} ended with status 0x{code:04X}: {failed} failed "
                              f"sub-operations, {len(received)} instances received")
    if not received:
        raise WsiArchiveError(f"{what} returned no instances (series unknown to the archive?)")
    logger.info("C-GET of series %s: %d instances", ref.series_uid, len(received))
    return received


