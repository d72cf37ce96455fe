"""Send a synthetic cohort to real peers: DICOM C-STORE, DICOMweb STOW-RS, HL7 over MLLP.

Per-file failures that the peer reports (a C-STORE failure status, an HTTP
error for one instance) are collected in a :class:`PushReport`; a peer that
cannot be reached or refuses the association raises :class:`PeerError`.
Logs name files, UIDs and counts only.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association

from ml.errors import PeerError, SynthError

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
ACK_ACCEPTED = ("AA", "CA")


@dataclass(frozen=True)
class PushReport:
    """What a push achieved: instances accepted, and ``"path: reason"`` for each failure."""

    sent: int
    failed: list[str] = field(default_factory=list)


def _contexts(paths: Sequence[Path]) -> tuple[list[tuple[str, str]], list[Path], list[str]]:
    """The (SOP class, transfer syntax) pairs, the readable files, and why others are not."""
    pairs: list[tuple[str, str]] = []
    readable: list[Path] = []
    unreadable: list[str] = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except (OSError, InvalidDicomError, AttributeError) as exc:
            unreadable.append(f"{path}: unreadable DICOM file meta ({exc})")
            continue
        readable.append(path)
        if pair not in pairs:
            pairs.append(pair)
    return pairs, readable, unreadable


def _associate(ae: AE, host: str, port: int, called_aet: str) -> Association:
    assoc = ae.associate(host, port, ae_title=called_aet)
    if assoc.is_established:
        return assoc
    peer = f"{host}:{port} (called AE {called_aet}, calling AE {ae.ae_title})"
    if assoc.is_rejected:
        raise PeerError(f"association rejected by {peer}")
    raise PeerError(f"no association with {peer}: peer unreachable or aborted")


class _AssociationLost(Exception):
    """The association ended before the peer answered a C-STORE request."""


def _store_one(assoc: Association, path: Path) -> str | None:
    """C-STORE one file on ``assoc``; ``None`` on success, else the failure reason.

    Raises
    ------
    _AssociationLost
        If the association dropped or the peer sent no response (the
        association is then aborted, so that the caller opens a new one).
    """
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        return f"unreadable DICOM file ({exc})"
    try:
        status = assoc.send_c_store(ds)
    except RuntimeError as exc:  # pynetdicom: association no longer established
        raise _AssociationLost(str(exc)) from exc
    except (ValueError, AttributeError) as exc:
        return f"not sent ({exc})"
    if "Status" not in status:
        if assoc.is_established:
            assoc.abort()
        raise _AssociationLost("no C-STORE response (association aborted or timed out)")
    code = int(status.Status)
    if code == 0x0000:
        return None
    if 0xB000 <= code <= 0xBFFF:
        logger.warning("C-STORE of SOP instance %s succeeded with warning status 0x%04X",
                       ds.SOPInstanceUID, code)
        return None
    return f"C-STORE status 0x{code:04X}"


def cstore_files(paths: Sequence[Path], host: str, port: int, called_aet: str,
                 calling_aet: str = "ONCOPACS_SYN") -> PushReport:
    """Send DICOM files to a Storage SCP over one association (reopened if it drops).

    Presentation contexts are one per (SOP class, transfer syntax) pair found
    in the files' meta information, so compressed files (e.g. WSI with JPEG
    Baseline) are sent as they are. Warning statuses (0xBxxx) count as sent.
    A file whose association drops before the peer answers is sent once more
    on a new association; if that drops too, the file is reported failed.

    Parameters
    ----------
    paths
        The DICOM Part 10 files to send.
    host, port
        The Storage SCP.
    called_aet, calling_aet
        AE titles of the peer and of this sender.

    Returns
    -------
    PushReport
        Files accepted, and ``"path: reason"`` for each file that was not
        (unreadable, no accepted context, failure status in hex).

    Raises
    ------
    PeerError
        If the peer cannot be reached or rejects the association (the message
        names host:port and both AE titles).
    SynthError
        If the files need more than 128 presentation contexts.
    """
    pairs, readable, failed = _contexts(paths)
    if len(pairs) > MAX_CONTEXTS:
        raise SynthError(f"{len(pairs)} (SOP class, transfer syntax) pairs in the files to send "
                         f"exceed the {MAX_CONTEXTS} presentation contexts of one association")
    if not readable:
        return PushReport(0, failed)
    ae = AE(ae_title=calling_aet)
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])
    sent = 0
    assoc = _associate(ae, host, port, called_aet)
    try:
        for path in readable:
            reason: str | None = None
            for _attempt in range(2):
                if not assoc.is_established:
                    logger.info("association with %s:%d dropped; reopening", host, port)
                    assoc = _associate(ae, host, port, called_aet)
                try:
                    reason = _store_one(assoc, path)
                    break
                except _AssociationLost as exc:
                    reason = f"{exc} (twice, on two associations)"
            if reason is None:
                sent += 1
            else:
                failed.append(f"{path}: {reason}")
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("C-STORE to %s:%d: %d sent, %d failed", host, port, sent, len(failed))
    return PushReport(sent, failed)


def _stow_failure(response: Any) -> str | None:
    """The failure reason in a STOW-RS response dataset, if any."""
    failures = response.get("FailedSOPSequence")
    if not failures:
        return None
    item = failures[0]
    reason = item.get("FailureReason")
    return f"STOW-RS failure reason 0x{int(reason):04X}" if reason is not None else "STOW-RS failed"


def stow_files(paths: Sequence[Path], url: str, *, max_attempts: int = 5) -> PushReport:
    """Store DICOM files with STOW-RS (one request per file) through dicomweb-client.

    Parameters
    ----------
    paths
        The DICOM Part 10 files to store.
    url
        The DICOMweb service root, e.g. ``http://localhost:8042/dicom-web``.
    max_attempts
        Attempts per request, with dicomweb-client's exponential back-off
        (1 s, 2 s, 4 s ...) on connection errors and on HTTP 408/429/503/504.

    Returns
    -------
    PushReport
        Files accepted, and ``"path: reason"`` (HTTP status or STOW failure
        reason) for each file that was not.

    Raises
    ------
    PeerError
        If the DICOMweb server cannot be reached (the message names ``url``).
    """
    client = DICOMwebClient(url)
    client.set_http_retry_params(retry=max_attempts > 1, max_attempts=max(1, max_attempts))
    sent = 0
    failed: list[str] = []
    for path in paths:
        try:
            ds = dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            failed.append(f"{path}: unreadable DICOM file ({exc})")
            continue
        try:
            response = client.store_instances([ds])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            failed.append(f"{path}: HTTP {code}")
            continue
        except requests.RequestException as exc:
            raise PeerError(f"STOW-RS to {url} failed: {exc}") from exc
        reason = _stow_failure(response)
        if reason is None:
            sent += 1
        else:
            failed.append(f"{path}: {reason}")
    logger.info("STOW-RS: %d sent, %d failed", sent, len(failed))
    return PushReport(sent, failed)


def _frame(path: Path) -> bytes:
    """The HL7 message in ``path`` wrapped in MLLP framing (``\\n`` separators become ``\\r``)."""
    data = path.read_bytes().strip(b"\x0b\x1c\r\n ")
    data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    return MLLP_START + data + b"\r" + MLLP_END


def _read_ack(sock: socket.socket) -> bytes:
    buffer = b""
    while not buffer.endswith(MLLP_END):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return buffer


def _ack_code(ack: str) -> tuple[str, str]:
    """MSA-1 (acknowledgment code) and MSA-3 (text) of an ACK, ``("", "")`` if absent."""
    for segment in ack.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split(segment[3]) if len(segment) > 3 else [segment]
            code = fields[1] if len(fields) > 1 else ""
            text = fields[3] if len(fields) > 3 else ""
            return code, text
    return "", ""


def mllp_send_files(paths: Sequence[Path], host: str, port: int,
                    timeout_s: float = 30.0) -> list[str]:
    """Send each file's HL7 message over MLLP (one connection per message); return the ACKs.

    Each file holds one ER7 message. Sending stops at the first message that
    is not accepted.

    Returns
    -------
    list[str]
        The ACK messages, without MLLP framing, in the order of ``paths``.

    Raises
    ------
    PeerError
        If the peer cannot be reached, times out, closes without an ACK, or
        answers with MSA-1 other than AA/CA; the message names the file.
    SynthError
        If a file cannot be read.
    """
    acks: list[str] = []
    for path in paths:
        try:
            frame = _frame(path)
        except OSError as exc:
            raise SynthError(f"cannot read HL7 file {path}: {exc}") from exc
        try:
            with socket.create_connection((host, port), timeout=timeout_s) as sock:
                sock.sendall(frame)
                raw = _read_ack(sock)
        except OSError as exc:
            raise PeerError(f"MLLP send of {path} to {host}:{port} failed: {exc}") from exc
        if not raw:
            raise PeerError(f"MLLP peer {host}:{port} closed without an ACK for {path}")
        ack = raw.strip(b"\x0b\x1c\r\n").decode("utf-8", errors="replace")
        code, text = _ack_code(ack)
        if code not in ACK_ACCEPTED:
            raise PeerError(f"MLLP peer {host}:{port} did not accept {path}: "
                            f"MSA-1 {code or 'missing'} {text}".rstrip())
        acks.append(ack)
    logger.info("MLLP to %s:%d: %d messages acknowledged", host, port, len(acks))
    return acks
