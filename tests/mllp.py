"""An HL7 v2 MLLP listener on loopback for the tests, built on hl7apy's ``MLLPServer``.

Every message received is parsed with hl7apy and kept; the sender gets an ACK:
``AA`` (or :attr:`MllpListener.ack_code`, for tests of negative acknowledgements) with
MSA-2 set to the message control id, or ``AE`` with the reason when parsing fails.
Several messages may travel on one connection (the ``hl7`` package's ``mllp_send``
sends a whole file that way), unlike hl7apy's own request handler, which reads one.
"""

from __future__ import annotations

import socketserver
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hl7apy.core import Message
from hl7apy.mllp import MLLPServer
from hl7apy.parser import parse_message

SB = b"\x0b"
EB = b"\x1c"
CR = b"\x0d"


@dataclass(frozen=True)
class Received:
    """One message as received (segments separated by ``\\r``) and as parsed."""

    raw: str
    message: Message

    @property
    def control_id(self) -> str:
        return str(self.message.msh.msh_10.value)

    @property
    def message_type(self) -> str:
        """MSH-9 as sent, e.g. ``ADT^A04`` or ``ADT^A04^ADT_A01``."""
        return str(self.message.msh.msh_9.value)


def _escape(text: str) -> str:
    """Escape HL7 delimiters (default encoding characters) in a field value."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("~", "\\R\\").replace("&", "\\T\\")
    return out.replace("\r", " ").replace("\n", " ")


def _msh_fields(raw: str) -> list[str]:
    """MSH fields of a raw message, best effort (for ACKs to unparseable messages)."""
    first = raw.split("\r", 1)[0]
    return first.split("|") if first.startswith("MSH|") else []


def build_ack(raw: str, code: str, text: str = "") -> str:
    """An ACK for ``raw`` with MSA-1 ``code``, MSA-2 its control id, MSA-3 ``text``."""
    msh = _msh_fields(raw)

    def field(index: int) -> str:
        return msh[index] if len(msh) > index else ""

    # msh[n] is MSH-(n+1): msh[2]=MSH-3 sending app ... msh[9]=MSH-10 control id
    trigger = field(8).split("^")[1] if "^" in field(8) else ""
    version = field(11) or "2.5"
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    control_id = field(9)
    header = "|".join(["MSH", "^~\\&", field(4), field(5), field(2), field(3), stamp, "",
                       f"ACK^{trigger}^ACK" if trigger else "ACK", f"ACK{control_id}",
                       field(10) or "P", version])
    msa = "|".join(["MSA", code, control_id] + ([_escape(text)] if text else []))
    return f"{header}\r{msa}\r"


class _Handler(socketserver.StreamRequestHandler):
    """Reads MLLP frames until the peer closes, answering each with an ACK."""

    server: _Server

    def handle(self) -> None:
        self.request.settimeout(self.server.timeout)
        buffer = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while (end := buffer.find(EB + CR)) != -1:
                frame, buffer = buffer[:end], buffer[end + 2:]
                start = frame.find(SB)
                if start == -1:
                    continue
                raw = frame[start + 1:].decode("utf-8", errors="replace")
                ack = self.server.listener.receive(raw)
                self.request.sendall(SB + ack.encode("utf-8") + EB + CR)


class _Server(MLLPServer):  # type: ignore[misc]
    daemon_threads = True
    block_on_close = False

    def __init__(self, listener: MllpListener, host: str, port: int, timeout: float) -> None:
        self.listener = listener
        super().__init__(host, port, handlers={}, timeout=timeout,
                         request_handler_class=_Handler)


class MllpListener:
    """An MLLP server on a free loopback port, in a background thread; a context manager."""

    host = "127.0.0.1"

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        self.ack_code = "AA"
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._rejected: list[tuple[str, str]] = []
        # port 0: the kernel picks a free port at bind time, so no other process can take it
        # between choosing and binding
        self._server = _Server(self, self.host, 0, timeout_s)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"mllp-listener-{self.port}", daemon=True)
        self._thread.start()

    @property
    def messages(self) -> list[Received]:
        """A copy of the messages parsed so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """``(raw, reason)`` of each message that could not be parsed."""
        with self._lock:
            return list(self._rejected)

    def receive(self, raw: str) -> str:
        """Parse and keep one message; return the ACK to send back."""
        try:
            message = parse_message(raw, find_groups=False)
            control_id = str(message.msh.msh_10.value)
        except Exception as exc:  # any hl7apy error means a malformed message
            reason = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._rejected.append((raw, reason))
            return build_ack(raw, "AE", reason)
        if not control_id:
            reason = "MSH-10 (message control id) is empty"
            with self._lock:
                self._rejected.append((raw, reason))
            return build_ack(raw, "AE", reason)
        with self._lock:
            self._messages.append(Received(raw, message))
        return build_ack(raw, self.ack_code)

    def wait_for_count(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` messages were parsed; return them.

        Raises
        ------
        TimeoutError
            If fewer arrived by the deadline.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(f"MLLP listener on port {self.port} got {len(messages)} "
                                   f"of {count} messages in {timeout_s} s "
                                   f"({len(self.rejected)} rejected)")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MllpListener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
