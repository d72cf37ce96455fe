"""Helpers of the clinical store and HL7 listener tests: messages, MLLP clients, ACK parsing."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import hl7

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Ack:
    """MSA-1, MSA-2, MSA-3 (unescaped) and ERR-3.1 (HL7 table 0357) of an ACK."""

    code: str
    control_id: str
    text: str
    error_code: str


def parse_ack(text: str) -> Ack:
    """Parse an ACK (segments separated by CR or LF, MLLP framing stripped) with ``hl7``."""
    body = text.strip("\x0b\x1c\r\n").replace("\r\n", "\r").replace("\n", "\r")
    msg = hl7.parse(body)
    msa = msg.segment("MSA")

    def field(seg: hl7.Segment, n: int) -> str:
        return msg.unescape(str(seg[n])) if len(seg) > n else ""

    error_code = ""
    try:
        err = msg.segment("ERR")
        error_code = str(err[3][0][0]) if len(err) > 3 and str(err[3]) else ""
    except KeyError:
        pass
    return Ack(field(msa, 1), field(msa, 2), field(msa, 3), error_code)


def mllp_send_cli(path: Path, port: int, host: str = "127.0.0.1") -> list[Ack]:
    """Send a file with the ``hl7`` package's ``mllp_send --loose``; the ACKs it printed."""
    exe = shutil.which("mllp_send")
    assert exe is not None, "mllp_send (from the hl7 package) not on PATH"
    proc = subprocess.run([exe, "--loose", "-f", str(path), "-p", str(port), host],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    frames = [f for f in proc.stdout.split(SB) if f.strip()]
    return [parse_ack(f.decode("utf-8")) for f in frames]


def frame(message: str | bytes) -> bytes:
    """Wrap one message in MLLP framing."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    return SB + data + EB + CR


def read_acks(sock: socket.socket, count: int) -> list[Ack]:
    """Read ``count`` MLLP-framed ACKs from ``sock``; fewer if the peer closes."""
    buffer = b""
    acks: list[Ack] = []
    while len(acks) < count:
        end = buffer.find(EB + CR)
        if end != -1:
            acks.append(parse_ack(buffer[:end].decode("utf-8")))
            buffer = buffer[end + 2:]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return acks


def send_raw(port: int, payload: bytes, count: int,
             context: ssl.SSLContext | None = None) -> list[Ack]:
    """Open one connection, send ``payload`` (already framed), read ``count`` ACKs."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as plain:
        sock = context.wrap_socket(plain, server_hostname="127.0.0.1") if context else plain
        sock.sendall(payload)
        return read_acks(sock, count)


def lab_message(control_id: str, *, identifier: str = "PAT-1", issuer: str = "HOSP_A",
                cea: str = "4.20", unit: str = "ug/L", ca19_9: str = "12.0",
                observed: str = "20240110080000", status: str = "F",
                sender: tuple[str, str] = ("LIS", "SITE1"), value_type: str = "NM",
                message_type: str = "ORU^R01^ORU_R01") -> str:
    """An ORU^R01 with CEA and CA 19-9 for one patient (segments separated by CR)."""
    cx = f"{identifier}^^^{issuer}^MR" if issuer else identifier
    return "\r".join([
        f"MSH|^~\\&|{sender[0]}|{sender[1]}|ONCOPACS|ONCOPACS|{observed}||{message_type}|"
        f"{control_id}|P|2.5",
        f"PID|1||{cx}||DOE^JANE||19600315|F",
        f"OBR|1|P{control_id}|F{control_id}|TUMMARK^Tumour markers^L|||{observed}",
        f"OBX|1|{value_type}|2039-6^CEA^LN||{cea}|{unit}^{unit}^UCUM|0-5||||{status}|||{observed}",
        f"OBX|2|NM|24108-3^CA 19-9^LN||{ca19_9}|U/mL^U/mL^UCUM|0-37||||{status}|||{observed}",
    ]) + "\r"


def pathology_message(control_id: str, *, identifier: str = "PAT-1", issuer: str = "HOSP_A",
                      t: str = "pT3", n: str = "pN1a", m: str = "cM0", stage: str = "IIIB",
                      site: str | None = None, observed: str = "20240120090000") -> str:
    """An ORU^R01 pathology report with coded TNM (AJCC8) and optionally the tumour site."""
    obx = [(t, "21899-0"), (n, "21900-6"), (m, "21901-4"), (stage, "21902-2")]
    segments = [
        f"MSH|^~\\&|PATH|SITE1|ONCOPACS|ONCOPACS|{observed}||ORU^R01^ORU_R01|{control_id}|P|2.5",
        f"PID|1||{identifier}^^^{issuer}^MR||DOE^JANE||19600315|F",
        f"OBR|1|P{control_id}|F{control_id}|11529-5^Surgical pathology study^LN|||{observed}",
    ]
    for i, (value, code) in enumerate(obx, start=1):
        segments.append(f"OBX|{i}|CWE|{code}^TNM^LN||{value}^{value}^AJCC8||||||F|||{observed}")
    if site is not None:
        segments.append(f"OBX|5|CWE|21905-5^Primary tumor site^LN||C18.7^{site}^ICDO3"
                        f"||||||F|||{observed}")
    return "\r".join(segments) + "\r"
