"""HL7 v2 intake: an MLLP server that commits each message to the clinical store, then ACKs.

One connection may carry many messages (each framed ``<VT> message <FS><CR>``); each
gets its ACK on the same connection, in order. The ACK code follows HL7 original
acknowledgement mode:

- ``AA`` only after :meth:`app.clinical.ClinicalStore.ingest` returned, i.e. after
  the commit;
- ``AE`` (MSA-3 and an ERR segment name the problem) for a message that parses but
  whose content is not acceptable, or when the store could not commit;
- ``AR`` for a message that cannot be parsed, is of an unsupported type, or is larger
  than ``max_message_bytes``.

Rejected messages are quarantined by the store with their reason. Only hosts in
``allowed_hosts`` (loopback when empty) may connect; TLS is optional. Logs carry
control ids and peer addresses, never patient names or identifiers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.clinical import ClinicalStore, ClinicalStoreError, Hl7MessageError
from ml.errors import OncopacsError

logger = logging.getLogger(__name__)

SB = b"\x0b"
EB = b"\x1c"
CR = b"\r"
HEAD_BYTES = 64 * 1024  # at most this much of an over-long message is kept (ACK, quarantine)
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Hl7ListenerError(OncopacsError):
    """The MLLP listener could not start (address in use, bad TLS files) or is not running."""


class Hl7ListenerSettings(BaseModel):
    """Where and how the MLLP listener accepts HL7 v2 messages.

    ``allowed_hosts`` holds IP addresses or networks (``10.0.0.0/8``); empty means
    loopback only. ``port`` 0 lets the system choose (see :attr:`Hl7Listener.port`).
    ``tls_client_ca_file`` makes client certificates mandatory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=2575, ge=0, le=65535)
    allowed_hosts: tuple[str, ...] = ()
    max_message_bytes: int = Field(default=1024 * 1024, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    application: str = "ONCOPACS"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_hosts entry {entry!r} is not an IP address or "
                                 "network") from exc
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Hl7ListenerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    def networks(self) -> tuple[Network, ...]:
        """The networks clients may connect from."""
        if not self.allowed_hosts:
            return LOOPBACK
        return tuple(ipaddress.ip_network(h, strict=False) for h in self.allowed_hosts)


def _escape(text: str) -> str:
    """Escape the default HL7 delimiters in a field value."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("~", "\\R\\").replace("&", "\\T\\")
    return "".join(c if c.isprintable() else " " for c in out)


def _msh(raw: str) -> list[str]:
    """MSH fields of a raw message, best effort; index n is MSH-(n+1)."""
    first = raw.replace("\n", "\r").lstrip("\r").split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return []
    return [f[:200] for f in first.split(first[3])]


def build_ack(raw: str, code: str, text: str = "", *, application: str = "ONCOPACS",
              error_code: str = "", location: str = "") -> str:
    """An HL7 v2.5 ACK for ``raw``: MSA-1 ``code``, MSA-2 its control id, MSA-3 ``text``.

    For AE and AR an ERR segment carries ``location`` (ERR-2), ``error_code`` (ERR-3,
    HL7 table 0357), severity E and ``text`` (ERR-8). Works for unparseable input.
    """
    msh = _msh(raw)

    def field(n: int) -> str:  # MSH-n
        return msh[n - 1] if len(msh) >= n else ""

    comp = field(2)[:1] or "^"
    trigger = field(9).split(comp)[1] if comp in field(9) else ""
    stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    header = "|".join(["MSH", "^~\\&", application, field(6), field(3), field(4), stamp, "",
                       f"ACK^{trigger}^ACK" if trigger else "ACK",
                       f"A{uuid.uuid4().hex[:19].upper()}", field(11) or "P",
                       field(12).split(comp)[0] or "2.5"])
    segments = [header, "|".join(["MSA", code, _escape(field(10)), _escape(text)]).rstrip("|")]
    if code != "AA":
        condition = {"100": "Segment sequence error", "101": "Required field missing",
                     "102": "Data type error", "103": "Table value not found",
                     "200": "Unsupported message type", "205": "Duplicate key identifier",
                     "207": "Application internal error"}.get(error_code, "")
        err3 = f"{error_code}^{condition}^HL70357" if error_code else ""
        segments.append("|".join(["ERR", "", location, err3, "E", "", "", "", _escape(text)]))
    return "\r".join(segments) + "\r"


def _decode(frame: bytes) -> str:
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError:
        return frame.decode("latin-1")


class _Framer:
    """Splits a byte stream into MLLP frames; over-long frames come out truncated."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.keep = min(max_bytes, HEAD_BYTES)  # bytes kept of an over-long frame
        self.buffer = bytearray()
        self.in_frame = False
        self.head: bytes | None = None  # set while discarding an over-long frame
        self.junk = 0  # bytes seen outside any frame

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Add received bytes; return the completed frames as (payload, too_large)."""
        self.buffer += data
        out: list[tuple[bytes, bool]] = []
        while True:
            if not self.in_frame:
                start = self.buffer.find(SB)
                if start == -1:
                    self.junk += len(self.buffer)
                    self.buffer.clear()
                    return out
                self.junk += start
                del self.buffer[:start + 1]
                self.in_frame = True
            end = self.buffer.find(EB + CR)
            if end == -1:
                if self.head is None and len(self.buffer) > self.max_bytes + 1:
                    self.head = bytes(self.buffer[:self.keep])
                if self.head is not None:  # keep the last byte: it may be the start of EB CR
                    del self.buffer[:-1]
                return out
            frame = bytes(self.buffer[:end])
            del self.buffer[:end + 2]
            self.in_frame = False
            if self.head is not None:
                out.append((self.head, True))
                self.head = None
            elif len(frame) > self.max_bytes:
                out.append((frame[:self.keep], True))
            else:
                out.append((frame, False))


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        listener = self.server.listener
        try:
            sock.settimeout(listener.settings.read_timeout_s)
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            framer = _Framer(listener.settings.max_message_bytes)
            while chunk := sock.recv(65536):
                for frame, too_large in framer.feed(chunk):
                    ack = listener.respond(frame, too_large, peer)
                    sock.sendall(SB + ack.encode("utf-8") + EB + CR)
            if framer.junk or framer.in_frame:
                logger.warning("MLLP %s: %d bytes outside frames, %s at close", peer,
                               framer.junk, "incomplete frame" if framer.in_frame else "no frame")
        except (OSError, ssl.SSLError) as exc:  # timeouts, resets, TLS failures
            logger.info("MLLP connection from %s ended: %s", peer, exc)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, listener: Hl7Listener, context: ssl.SSLContext | None) -> None:
        self.listener = listener
        self.context = context
        self.networks = listener.settings.networks()
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        host = listener.settings.host
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, listener.settings.port), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.context is not None:  # handshake in the connection's thread, not here
            sock = self.context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = ipaddress.ip_address(client_address[0])
        if any(address in net for net in self.networks):
            return True
        logger.warning("MLLP connection from %s refused: not in allowed_hosts", address)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)


class Hl7Listener:
    """MLLP server feeding a :class:`ClinicalStore`; runs in background threads.

    Use :meth:`start` and :meth:`stop`, or the object as a context manager.
    """

    def __init__(self, settings: Hl7ListenerSettings, store: ClinicalStore, *,
                 on_ack: Callable[[str], None] | None = None) -> None:
        self._on_ack = on_ack
        self.settings = settings
        self.store = store
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to.

        Raises
        ------
        Hl7ListenerError
            If the listener is not started.
        """
        if self._server is None:
            raise Hl7ListenerError("HL7 listener is not started")
        port: int = self._server.server_address[1]
        return port

    def start(self) -> Hl7Listener:
        """Bind and serve in a background thread; returns at once.

        Raises
        ------
        Hl7ListenerError
            If the address cannot be bound or the TLS files cannot be loaded.
        """
        if self._server is not None:
            raise Hl7ListenerError(f"HL7 listener already running on port {self.port}")
        s = self.settings
        try:
            context = self._tls_context()
            self._server = _Server(self, context)
        except (OSError, ssl.SSLError) as exc:
            raise Hl7ListenerError(f"HL7 listener cannot listen on {s.host}:{s.port}: {exc}"
                                   ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"hl7-listener-{self.port}", daemon=True)
        self._thread.start()
        logger.info("HL7 MLLP listener on %s:%d%s", s.host, self.port,
                    " (TLS)" if context else "")
        return self

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert_file is None or s.tls_key_file is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(s.tls_cert_file, s.tls_key_file)
        if s.tls_client_ca_file is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(s.tls_client_ca_file)
        return context

    def stop(self) -> None:
        """Stop accepting, close open connections and wait for the server thread."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with server.lock:
            for sock in list(server.connections):
                with contextlib.suppress(OSError):  # already closed by the peer
                    sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        logger.info("HL7 MLLP listener stopped")

    def __enter__(self) -> Hl7Listener:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def respond(self, frame: bytes, too_large: bool = False, peer: str = "") -> str:
        """Handle one MLLP payload and return the ACK to send; never raises.

        The ACK code (AA, AE, AR) is told to ``on_ack`` (metrics).
        """
        ack = self._respond(frame, too_large, peer)
        if self._on_ack is not None:
            code = next((seg.split("|")[1] for seg in ack.split("\r")
                         if seg.startswith("MSA|") and seg.count("|") >= 1), "?")
            with contextlib.suppress(Exception):
                self._on_ack(code)
        return ack

    def _respond(self, frame: bytes, too_large: bool = False, peer: str = "") -> str:
        """Handle one MLLP payload and return the ACK to send; never raises.

        AA only after the store committed; a store failure gives AE.
        """
        raw = _decode(frame)
        app = self.settings.application
        if too_large:
            reason = (f"message larger than max_message_bytes "
                      f"({self.settings.max_message_bytes} bytes)")
            self._quarantine(raw, f"{reason}; only the first {len(frame)} bytes kept", "AR",
                             peer)
            return build_ack(raw, "AR", reason, application=app, error_code="207")
        try:
            result = self.store.ingest(raw)
        except Hl7MessageError as exc:
            logger.warning("HL7 %s from %s: %s (%s)", exc.control_id or "(no control id)",
                           peer, exc.ack_code, exc.error_code)
            return build_ack(raw, exc.ack_code, exc.reason, application=app,
                             error_code=exc.error_code, location=exc.location)
        except ClinicalStoreError as exc:
            logger.error("HL7 from %s not stored: %s", peer, exc)
            return build_ack(raw, "AE", f"clinical store could not commit: {exc}",
                             application=app, error_code="207")
        except Exception as exc:  # a bug must not take the listener down
            logger.exception("HL7 from %s: unexpected error", peer)
            reason = f"internal error: {type(exc).__name__}"
            self._quarantine(raw, reason, "AE", peer)
            return build_ack(raw, "AE", reason, application=app, error_code="207")
        return build_ack(raw, "AA", "duplicate" if result.duplicate else "", application=app)

    def _quarantine(self, raw: str, reason: str, code: str, peer: str) -> None:
        cid = (_msh(raw)[9:10] or [""])[0] or None
        try:
            self.store.quarantine(raw, reason, code, cid)
        except ClinicalStoreError as exc:
            logger.error("HL7 %s from %s rejected and NOT quarantined: %s", cid, peer, exc)
