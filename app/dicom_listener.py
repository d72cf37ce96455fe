"""DICOM Storage SCP that spools what it accepts and records it in the job store.

:class:`DicomListener` wraps a pynetdicom AE. Its handlers are bound with their
dependencies as arguments (``(evt.EVT_C_STORE, handle_store, [spool, jobs, clock])``).

- Only peers in ``allowed_peers`` (AE title, and host when given) may associate; others
  get an A-ASSOCIATE-RJ (rejected-permanent, service user, "calling AE title not
  recognised"). The called AE title must be the listener's own.
- The C-STORE handler never raises. It answers 0x0000 only after the instance is fsynced
  in the spool and recorded in the job store; 0xC210 ("cannot understand") for data that
  does not decode or is truncated; 0xA900 ("data set does not match SOP class") for an
  object that lacks what its SOP class needs; 0xA700 ("out of resources") when the disk
  or job store write fails. Rejected data is quarantined with its reason, which is also
  logged (UIDs only) and sent back as the Error Comment.
- Compressed transfer syntaxes are accepted and stored as received (no transcoding).
- A study is complete after ``quiet_period_s`` with no new instance
  (:meth:`DicomListener.poll_completed`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom import Dataset, uid
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from app.jobs import Job, JobStore
from app.spool import Spool, SpoolError, check_uid
from ml.errors import OncopacsError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
ERROR_COMMENT_CHARS = 64
VERIFICATION = "1.2.840.10008.1.1"
UNDEFINED_LENGTH = 0xFFFFFFFF

DEFAULT_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in StoragePresentationContexts)
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(str(ts) for ts in (
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
    uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
    uid.RLELossless))

_PLANE = ("PixelData", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient",
          "PixelSpacing")
_ENHANCED = ("PixelData", "NumberOfFrames", "SharedFunctionalGroupsSequence",
             "PerFrameFunctionalGroupsSequence")
_SR = ("ValueType", "ConceptNameCodeSequence", "ContentSequence")
# What an object of each SOP class must carry beyond its study, series and SOP UIDs.
REQUIRED_BY_SOP_CLASS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.5.1.4.1.1.2": _PLANE,  # CT Image
    "1.2.840.10008.5.1.4.1.1.4": _PLANE,  # MR Image
    "1.2.840.10008.5.1.4.1.1.128": _PLANE,  # PET Image
    "1.2.840.10008.5.1.4.1.1.2.1": _ENHANCED,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1": _ENHANCED,  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.130": _ENHANCED,  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.77.1.6": ("PixelData", "NumberOfFrames", "TotalPixelMatrixRows",
                                       "TotalPixelMatrixColumns"),  # VL Whole Slide Microscopy
    "1.2.840.10008.5.1.4.1.1.66.4": ("PixelData", "NumberOfFrames",
                                     "SegmentSequence"),  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.34": _SR,  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22": _SR,  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": _SR,  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.7": ("PixelData", "Rows", "Columns"),  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.104.1": ("EncapsulatedDocument",
                                      "MIMETypeOfEncapsulatedDocument"),  # Encapsulated PDF
}


class ListenerError(OncopacsError):
    """The DICOM listener could not start (address in use, bad TLS files)."""


class PeerSettings(BaseModel):
    """A peer allowed to send: its calling AE title, and its address when given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(min_length=1, max_length=16)
    host: str | None = None


class TlsSettings(BaseModel):
    """TLS for the listener: its certificate chain and key; ``ca_path`` requires client
    certificates signed by that CA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_path: Path
    key_path: Path
    ca_path: Path | None = None


class ListenerSettings(BaseModel):
    """Configuration of the DICOM listener (Storage SCP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(default="ONCOPACS", min_length=1, max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535, description="0: any free port (see DicomListener.port)")
    allowed_peers: tuple[PeerSettings, ...] = ()
    require_known_peers: bool = True
    max_pdu: int = Field(default=1_048_576, ge=0, description="0: unlimited")
    quiet_period_s: float = Field(default=30.0, ge=0.0)
    sop_classes: tuple[str, ...] = DEFAULT_SOP_CLASSES
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES
    tls: TlsSettings | None = None

    @field_validator("sop_classes", "transfer_syntaxes")
    @classmethod
    def _uids(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError("needs at least one UID")
        for value in values:
            try:
                check_uid(value, "UID")
            except SpoolError as exc:
                raise ValueError(str(exc)) from exc
        return values


@dataclass(frozen=True)
class Rejection:
    """Why an instance was refused: the C-STORE status, a short comment for the peer's
    Error Comment (64 characters, no UIDs) and the full reason naming UIDs."""

    status: int
    comment: str
    reason: str


def _truncated_element(ds: Dataset) -> str | None:
    """Say so if the last element holds less than its declared length (a cut stream).

    pydicom keeps such a value without complaint; only the last element read can be cut.
    """
    tags = list(ds.keys())
    raw = ds.get_item(tags[-1]) if tags else None
    if (isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH
            and raw.value is not None and len(raw.value) < raw.length):
        return f"{raw.tag} holds {len(raw.value)} of its {raw.length} bytes"
    return None


def _pixel_shortfall(ds: Dataset, transfer_syntax: UID) -> str | None:
    """For native pixel data, say so if it is shorter than the image attributes need."""
    if transfer_syntax.is_compressed or "PixelData" not in ds:
        return None
    needed_bits = (int(ds.get("Rows", 0)) * int(ds.get("Columns", 0))
                   * int(ds.get("SamplesPerPixel", 1)) * int(ds.get("NumberOfFrames", 1) or 1)
                   * int(ds.get("BitsAllocated", 0)))
    needed = (needed_bits + 7) // 8
    have = len(ds.get_item("PixelData").value or b"")
    if have < needed:
        return f"PixelData holds {have} bytes, its image attributes need {needed}"
    return None


def check_instance(ds: Dataset, sop_class_uid: str, sop_instance_uid: str,
                   transfer_syntax: UID) -> Rejection | None:
    """Decide whether a received data set may be stored; None when it may.

    ``sop_class_uid`` and ``sop_instance_uid`` are the C-STORE request's Affected SOP
    Class and Instance UIDs. Raises whatever pydicom raises on undecodable values.
    """
    sop = sop_instance_uid
    if len(ds) == 0 or "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        return Rejection(CANNOT_UNDERSTAND, "no SOP Class and Instance UID decoded",
                         f"instance {sop}: truncated or not DICOM")
    broken = _truncated_element(ds) or _pixel_shortfall(ds, transfer_syntax)
    if broken:
        return Rejection(CANNOT_UNDERSTAND, f"truncated: {broken}",
                         f"instance {sop} is truncated: {broken}")
    if ds.SOPClassUID != sop_class_uid or ds.SOPInstanceUID != sop:
        return Rejection(DOES_NOT_MATCH_SOP_CLASS, "SOP Class/Instance UID differ from request",
                         f"instance {sop}: data set says SOP Class {ds.SOPClassUID} / "
                         f"Instance {ds.SOPInstanceUID}, the request {sop_class_uid} / {sop}")
    needed = ("StudyInstanceUID", "SeriesInstanceUID",
              *REQUIRED_BY_SOP_CLASS.get(sop_class_uid, ()))
    missing = ", ".join(kw for kw in needed if kw not in ds or ds[kw].is_empty)
    if missing:
        name = UID(sop_class_uid).name
        return Rejection(DOES_NOT_MATCH_SOP_CLASS, f"{name} has no {missing}",
                         f"{name} instance {sop} has no {missing}")
    try:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            check_uid(str(ds[keyword].value), keyword)
    except SpoolError as exc:
        return Rejection(DOES_NOT_MATCH_SOP_CLASS, "malformed UID", f"instance {sop}: {exc}")
    return None


def _status(status: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment[:ERROR_COMMENT_CHARS]
    return rsp


def _reject(spool: Spool, data: bytes, rejection: Rejection, calling_aet: str) -> Dataset:
    log.warning("rejected C-STORE from %s with 0x%04X: %s", calling_aet, rejection.status,
                rejection.reason)
    try:
        spool.quarantine(data, rejection.reason, calling_aet)
    except OSError as exc:
        log.error("could not quarantine rejected data from %s: %s", calling_aet, exc)
    return _status(rejection.status, rejection.comment)


StatusHook = Callable[[int], None]
"""Told the status of every C-STORE answered (for metrics); must not raise."""


def handle_store(event: evt.Event, spool: Spool, jobs: JobStore,
                 clock: Callable[[], float], on_status: StatusHook | None = None) -> Dataset:
    """EVT_C_STORE handler: validate, spool (fsync), record; never raises."""
    try:
        status = _store(event, spool, jobs, clock)
    except Exception:  # a handler must answer; pynetdicom would send 0xC211
        log.exception("unexpected error handling C-STORE")
        status = _status(OUT_OF_RESOURCES, "internal error while storing")
    if on_status is not None:
        with contextlib.suppress(Exception):
            on_status(int(status.Status))
    return status


def _store(event: evt.Event, spool: Spool, jobs: JobStore,
           clock: Callable[[], float]) -> Dataset:
    calling = str(event.assoc.requestor.ae_title)
    request = cast(C_STORE, event.request)
    sop_uid = str(request.AffectedSOPInstanceUID)
    data = event.encoded_dataset()
    try:
        ds = event.dataset
        rejection = check_instance(ds, str(request.AffectedSOPClassUID), sop_uid,
                                   event.context.transfer_syntax)
    except Exception as exc:  # pydicom raises many types on malformed values
        rejection = Rejection(CANNOT_UNDERSTAND, f"does not decode ({type(exc).__name__})",
                              f"instance {sop_uid}: the data set does not decode "
                              f"({type(exc).__name__}: {exc})")
    if rejection is not None:
        return _reject(spool, data, rejection, calling)
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    try:
        spool.store(study_uid, series_uid, sop_uid, data)
    except OSError as exc:
        log.error("could not spool instance %s of study %s: %s", sop_uid, study_uid, exc)
        return _status(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}")
    try:
        jobs.record_instance(study_uid, series_uid, sop_uid, calling, clock())
    except (sqlite3.Error, OncopacsError) as exc:
        log.error("could not record instance %s of study %s: %s", sop_uid, study_uid, exc)
        return _status(OUT_OF_RESOURCES, "job store write failed")
    log.debug("stored instance %s of series %s, study %s from %s", sop_uid, series_uid,
              study_uid, calling)
    return _status(SUCCESS)


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO handler: answer success."""
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return SUCCESS


def handle_requested(event: evt.Event, settings: ListenerSettings) -> None:
    """EVT_REQUESTED handler: reject peers that are not in ``allowed_peers``."""
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    host = str(event.assoc.requestor.address)
    if not settings.require_known_peers or any(
            peer.ae_title == calling and peer.host in (None, host)
            for peer in settings.allowed_peers):
        return
    log.warning("rejected association from %r at %s: calling AE title not recognised",
                calling, host)
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)
    event.assoc.kill()  # as pynetdicom does after its own rejections: lets the RJ go out


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A TLS 1.2+ server context from the settings' certificate, key and optional CA.

    Raises
    ------
    ListenerError
        If a file cannot be read or does not hold what it should.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert_path, tls.key_path)
        if tls.ca_path is not None:
            ctx.load_verify_locations(cafile=tls.ca_path)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(f"TLS files {tls.cert_path}, {tls.key_path}, {tls.ca_path}: "
                            f"{exc}") from exc
    return ctx


class DicomListener:
    """A Storage SCP on ``settings.host``:``settings.port`` feeding a spool and job store.

    Parameters
    ----------
    settings:
        Listener configuration.
    spool, jobs:
        Where accepted instances go.
    clock:
        Seconds since the epoch, stamped on each recorded instance.
    on_status:
        Told each C-STORE status answered (metrics).
    """

    def __init__(self, settings: ListenerSettings, spool: Spool, jobs: JobStore, *,
                 clock: Callable[[], float] = time.time,
                 on_status: StatusHook | None = None) -> None:
        self.settings = settings
        self._on_status = on_status
        self.spool = spool
        self.jobs = jobs
        self._clock = clock
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._lock = threading.Lock()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION)
        for sop_class in s.sop_classes:
            ae.add_supported_context(sop_class, list(s.transfer_syntaxes))
        return ae

    def start(self) -> DicomListener:
        """Start serving in background threads; returns self.

        Raises
        ------
        ListenerError
            If the address cannot be bound or the TLS files are unusable.
        """
        with self._lock:
            if self._server is not None:
                return self
            s = self.settings
            ae = self._make_ae()
            handlers: list[Any] = [
                (evt.EVT_REQUESTED, handle_requested, [s]),
                (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_C_STORE, handle_store,
                 [self.spool, self.jobs, self._clock, self._on_status]),
            ]
            ctx = server_ssl_context(s.tls) if s.tls is not None else None
            try:
                self._server = ae.start_server((s.host, s.port), block=False,
                                               evt_handlers=handlers, ssl_context=ctx)
            except OSError as exc:
                raise ListenerError(f"cannot listen on {s.host}:{s.port}: {exc}") from exc
            self._ae = ae
        log.info("DICOM listener %s on %s:%d%s", s.ae_title, s.host, self.port,
                 " (TLS)" if ctx else "")
        return self

    def stop(self) -> None:
        """Stop accepting associations and close open ones."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
            if self._ae is not None:
                self._ae.shutdown()
                self._ae = None

    def __enter__(self) -> DicomListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port being served (the one the OS chose when settings.port is 0).

        Raises
        ------
        ListenerError
            If the listener is not started.
        """
        if self._server is None:
            raise ListenerError("the DICOM listener is not started")
        return int(self._server.server_address[1])

    def poll_completed(self, now: float | None = None) -> list[Job]:
        """Jobs of studies quiet for ``quiet_period_s`` (each returned once)."""
        return self.jobs.complete_quiet_studies(self.settings.quiet_period_s,
                                                self._clock() if now is None else now)
