"""Helpers for the ingest tests: dcmtk storescu/echoscu runs, data set bytes, a fake clock,
and a job-store writer that a test kills with SIGKILL.

``python -m tests.listener_helpers write-jobs DB`` opens a :class:`app.jobs.JobStore`,
fills it, claims one job (prints ``RUNNING <id>``), then keeps recording instances and
printing ``WROTE <n>`` until it is killed.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.tools import dcmtk

CALLING_AET = "STORESCU"
LISTENER_AET = "ONCOPACS"
TIMEOUT_S = 60


@dataclass
class FakeClock:
    """An injectable clock: ``clock()`` returns ``now``; tests move it by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk 3.6.7, which leaves Nagle's algorithm on unless told.

    Without ``TCP_NODELAY=1`` every small PDU waits for a delayed ACK (about 40 ms on
    Linux), which makes dcmtk peers look 50 times slower than they are.
    """
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, *paths: Path, calling: str = CALLING_AET,
             called: str = LISTENER_AET, extra: tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess[str]:
    """Send files or folders (``*.dcm`` below them) with dcmtk storescu; does not raise.

    ``-R`` proposes only the SOP classes found, with explicit VR little endian first, so
    the synthetic CT travels byte for byte. JPEG WSI needs ``extra=("-xy",)`` (JPEG
    Baseline; storescu cannot decompress it); that option also makes storescu send
    uncompressed files as implicit VR, so send the two kinds separately.
    """
    args = [dcmtk("storescu"), "-R", "-aet", calling, "-aec", called, "+sd", "+r",
            "+sp", "*.dcm", *extra, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(args, capture_output=True, text=True, check=False,
                          timeout=TIMEOUT_S, env=dcmtk_env())


def echoscu(port: int, calling: str = CALLING_AET, called: str = LISTENER_AET
            ) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk echoscu; does not raise."""
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1",
                           str(port)], capture_output=True, text=True, check=False,
                          timeout=TIMEOUT_S, env=dcmtk_env())


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: everything after its File Meta Information.

    Uses (0002,0000) File Meta Information Group Length, which Part 10 requires first.
    """
    data = path.read_bytes()
    group_length_tag = b"\x02\x00\x00\x00UL\x04\x00"
    if data[128:132] != b"DICM" or data[132:140] != group_length_tag:
        raise AssertionError(f"{path} does not start with a Part 10 header and group length")
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length:]


def _write_jobs(db: Path) -> None:
    from app.jobs import JobStore

    store = JobStore(db)
    now = 1_000.0
    for study in range(3):
        for sop in range(5):
            store.record_instance(f"1.2.{study}", f"1.2.{study}.1", f"1.2.{study}.1.{sop}",
                                  "WRITER", now)
    for job in store.complete_quiet_studies(10.0, now + 60):
        store.enqueue(job.id, "B")
    running = store.claim_next()
    assert running is not None
    print(f"RUNNING {running.id}", flush=True)
    n = 0
    while True:
        n += 1
        store.record_instance("1.3.1", "1.3.1.1", f"1.3.1.1.{n}", "WRITER", now + 100 + n)
        store.record_timing(running.id, "segmentation", float(n))
        print(f"WROTE {n}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "write-jobs":
        _write_jobs(Path(argv[1]))
    else:
        raise SystemExit("usage: python -m tests.listener_helpers write-jobs DB")


if __name__ == "__main__":
    main(sys.argv[1:])


def self_signed_cert(folder: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1/localhost and its key; returns paths."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{common_name}.crt", folder / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
