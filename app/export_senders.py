"""Senders for the export outbox (:mod:`app.export`): DICOM C-STORE and DICOMweb STOW-RS.

A sender sends files once and says, per file, whether the peer accepted it and,
if not, whether trying again could help (see :mod:`app.export` for the status
classes). It raises :class:`SendError` when it could send nothing at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association

from ml.errors import ConfigError, PeerError

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
PERMANENT_STATUSES = "0x0122, 0x0124, 0xA900-0xA9FF, 0xC000-0xCFFF"
PERMANENT_HTTP = frozenset({400, 401, 403, 409, 413, 415})
_STATUS_TEXT = {0x0122: "SOP class not supported", 0x0124: "not authorised",
                0x0110: "processing failure", 0x0211: "unrecognised operation"}


class SendError(PeerError):
    """Nothing could be sent (peer unreachable, association refused, unusable files)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class FileOutcome:
    """What the peer did with one file."""

    path: Path
    accepted: bool
    error: str | None = None
    permanent: bool = False


def status_outcome(path: Path, uid: str, code: int) -> FileOutcome:
    """Classify a C-STORE (or STOW-RS failure reason) status for one instance."""
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        if code:
            logger.warning("SOP instance %s stored with warning status 0x%04X", uid, code)
        return FileOutcome(path, True)
    if 0xA700 <= code <= 0xA7FF:
        text = "out of resources"
    elif 0xA900 <= code <= 0xA9FF:
        text = "data set does not match SOP class"
    elif 0xC000 <= code <= 0xCFFF:
        text = "cannot understand"
    else:
        text = _STATUS_TEXT.get(code, "failure")
    permanent = code in (0x0122, 0x0124) or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF
    return FileOutcome(path, False, f"SOP instance {uid}: status 0x{code:04X} ({text})", permanent)


def _meta(paths: Sequence[Path]) -> tuple[dict[Path, tuple[str, str, str]], list[FileOutcome]]:
    """(SOP class, transfer syntax, SOP instance) per readable file; outcomes for the others."""
    found: dict[Path, tuple[str, str, str]] = {}
    bad: list[FileOutcome] = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            found[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID),
                           str(meta.MediaStorageSOPInstanceUID))
        except (OSError, InvalidDicomError, AttributeError) as exc:
            bad.append(FileOutcome(path, False, f"file {path.name}: unreadable DICOM file "
                                   f"meta ({type(exc).__name__})", True))
    return found, bad


class CStoreSender:
    """C-STORE to a Storage SCP, one association per call.

    Presentation contexts are one per (SOP class, transfer syntax) pair of the files
    (SEG, SR, Secondary Capture, Encapsulated PDF ... as they are stored).
    """

    def __init__(self, host: str, port: int, called_aet: str, calling_aet: str = "ONCOPACS",
                 timeout_s: float = 30.0) -> None:
        self.host, self.port = host, port
        self.called_aet, self.calling_aet = called_aet, calling_aet
        self.timeout_s = timeout_s

    @property
    def description(self) -> str:
        return f"C-STORE {self.called_aet}@{self.host}:{self.port}"

    def _associate(self, pairs: set[tuple[str, str]]) -> Association:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for sop_class, syntax in sorted(pairs):
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
        if assoc.is_established:
            return assoc
        how = "rejected" if assoc.is_rejected else "not established (peer unreachable or aborted)"
        raise SendError(f"association from AE {self.calling_aet} {how}")

    def send(self, files: Sequence[Path]) -> list[FileOutcome]:
        """C-STORE each file; see :mod:`app.export` for which statuses are permanent.

        Raises
        ------
        SendError
            If no association could be opened (retryable), or the files need more
            than 128 presentation contexts (permanent).
        """
        meta, outcomes = _meta(files)
        pairs = {(sop, syntax) for sop, syntax, _ in meta.values()}
        if len(pairs) > MAX_CONTEXTS:
            raise SendError(f"{len(pairs)} (SOP class, transfer syntax) pairs exceed the "
                            f"{MAX_CONTEXTS} presentation contexts of one association",
                            permanent=True)
        if meta:
            assoc = self._associate(pairs)
            try:
                outcomes += [self._store(assoc, path, *meta[path]) for path in meta]
            finally:
                if assoc.is_established:
                    assoc.release()
        order = {path: i for i, path in enumerate(files)}
        return sorted(outcomes, key=lambda o: order[o.path])

    def _store(self, assoc: Association, path: Path, sop_class: str, syntax: str,
               uid: str) -> FileOutcome:
        if not assoc.is_established:
            return FileOutcome(path, False, f"SOP instance {uid}: association with "
                               f"{self.description} lost before it was sent")
        try:
            status = assoc.send_c_store(path)
        except ValueError:
            return FileOutcome(path, False, f"SOP instance {uid}: {self.description} accepted "
                               f"no presentation context for SOP class {sop_class} with "
                               f"transfer syntax {syntax}", True)
        except AttributeError as exc:
            return FileOutcome(path, False, f"SOP instance {uid}: cannot be sent ({exc})", True)
        except (RuntimeError, OSError) as exc:
            return FileOutcome(path, False, f"SOP instance {uid}: association with "
                               f"{self.description} lost ({exc})")
        if "Status" not in status:
            if assoc.is_established:
                assoc.abort()
            return FileOutcome(path, False, f"SOP instance {uid}: no C-STORE response from "
                               f"{self.description} within {self.timeout_s:g} s")
        return status_outcome(path, uid, int(status.Status))


class StowSender:
    """STOW-RS to a DICOMweb service root (one request per file), through dicomweb-client.

    dicomweb-client's own retries are turned off: the outbox decides when to retry.
    """

    def __init__(self, url: str, timeout_s: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.url = url
        self.client = DICOMwebClient(url, session=session, timeout=timeout_s)
        self.client.set_http_retry_params(retry=False)

    @property
    def description(self) -> str:
        return f"STOW-RS {self.url}"

    def send(self, files: Sequence[Path]) -> list[FileOutcome]:
        """Store each file; connection failures stop the call and are retryable.

        Raises
        ------
        SendError
            If the first request cannot reach the server (retryable).
        """
        outcomes: list[FileOutcome] = []
        for index, path in enumerate(files):
            try:
                ds = dcmread(path)
            except (OSError, InvalidDicomError) as exc:
                outcomes.append(FileOutcome(path, False, f"file {path.name}: unreadable DICOM "
                                            f"file ({type(exc).__name__})", True))
                continue
            uid = str(ds.get("SOPInstanceUID", path.name))
            try:
                response = self.client.store_instances([ds])
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                outcomes.append(FileOutcome(path, False, f"SOP instance {uid}: HTTP {code} "
                                            f"from {self.description}", code in PERMANENT_HTTP))
                continue
            except requests.RequestException as exc:
                error = f"{self.description} unreachable ({type(exc).__name__})"
                if index == 0:
                    raise SendError(error) from exc
                outcomes += [FileOutcome(p, False, error) for p in files[index:]]
                break
            failed = response.get("FailedSOPSequence") if response is not None else None
            reason = failed[0].get("FailureReason") if failed else None
            if failed:
                outcomes.append(status_outcome(path, uid, int(reason) if reason is not None
                                               else 0x0110))
            else:
                outcomes.append(FileOutcome(path, True))
        return outcomes


class DestinationSettings(BaseModel):
    """One export destination: a C-STORE SCP (host, port, AE titles) or a STOW-RS service."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["c-store", "stow-rs"]
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    called_aet: str | None = Field(default=None, max_length=16)
    calling_aet: str = Field(default="ONCOPACS", max_length=16)
    url: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> DestinationSettings:
        need = ("host", "port", "called_aet") if self.kind == "c-store" else ("url",)
        if missing := [name for name in need if getattr(self, name) is None]:
            raise ValueError(f"destination {self.name!r} ({self.kind}) needs {missing}")
        return self


def make_sender(destination: DestinationSettings) -> CStoreSender | StowSender:
    """The sender for a configured destination.

    Raises
    ------
    ConfigError
        If the settings lack what the kind needs (only when built without validation).
    """
    d = destination
    if d.kind == "c-store":
        if d.host is None or d.port is None or d.called_aet is None:
            raise ConfigError(f"destination {d.name!r}: C-STORE needs host, port and called_aet")
        return CStoreSender(d.host, d.port, d.called_aet, d.calling_aet, d.timeout_s)
    if d.url is None:
        raise ConfigError(f"destination {d.name!r}: STOW-RS needs url")
    return StowSender(d.url, d.timeout_s)
