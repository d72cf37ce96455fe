"""The HL7 MLLP listener against real peers: the ``hl7`` package's ``mllp_send`` CLI,
raw TCP and TLS clients, another SQLite writer holding the lock, and openssl certificates.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.clinical import ClinicalStore
from app.hl7_listener import Hl7Listener, Hl7ListenerError, Hl7ListenerSettings, _Framer
from ml.synth.cohort import CohortOptions, generate_cohort
from tests.clinical_helpers import (
    TIMEOUT_S,
    frame,
    lab_message,
    mllp_send_cli,
    read_acks,
    send_raw,
)

pytestmark = pytest.mark.peers

SEED = 4242
BEFORE = dt.datetime(2024, 6, 1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(CohortOptions(out=out, patients=3, seed=SEED, size="tiny", workers=1))
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return out, manifest


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[ClinicalStore]:
    with ClinicalStore(tmp_path / "clinical.db", busy_timeout_s=0.3) as opened:
        yield opened


@pytest.fixture()
def listener(store: ClinicalStore) -> Iterator[Hl7Listener]:
    with Hl7Listener(Hl7ListenerSettings(port=0, read_timeout_s=10), store) as running:
        yield running


def _stored(path: Path, control_id: str) -> int:
    """How many times ``control_id`` is in the messages table, read by another connection."""
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE control_id=?",
                           (control_id,)).fetchone()
        return int(row[0])


def test_cohort_over_mllp_send_lands_in_the_store(cohort: tuple[Path, dict[str, Any]],
                                                  listener: Hl7Listener, store: ClinicalStore,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    root, manifest = cohort
    for patient in manifest["patients"]:
        for rel in patient["hl7"]:
            path = root / rel
            acks = mllp_send_cli(path, listener.port)
            control_id = path.read_bytes().split(b"\r", 1)[0].split(b"|")[9].decode()
            assert [(a.code, a.control_id) for a in acks] == [("AA", control_id)]
            assert _stored(store.path, control_id) == 1  # committed before the ACK came
    for patient in manifest["patients"]:
        labels = patient["labels"]
        surgery = dt.date.fromisoformat(patient["surgery_date"])
        when = dt.datetime.combine(surgery + dt.timedelta(days=30), dt.time())
        got = store.clinical_fields(patient["patient_id"], patient["issuer"], when)
        assert got.cea_ug_l is not None and got.ca19_9_u_ml is not None
        assert got.cea_ug_l.value == pytest.approx(labels["cea_ug_l"], abs=0.005)
        assert got.ca19_9_u_ml.value == pytest.approx(labels["ca19_9_u_ml"], abs=0.05)
        assert got.sex is not None and got.sex.value == patient["sex"]
        assert got.age_years is not None and abs(got.age_years.value
                                                 - patient["age_years"]) <= 1
        if patient["group"] == "CRC":
            assert [f.value if f else None for f in (got.t, got.n, got.m, got.stage_group)] == [
                f"pT{labels['t_stage']}", f"pN{labels['n_stage']}", "cM0",
                labels["stage_group"]]
        else:
            assert got.t is None and got.n is None and got.m is None
        pre_op = store.clinical_fields(patient["patient_id"], patient["issuer"],
                                       dt.datetime.combine(surgery, dt.time()))
        assert pre_op.t is None and pre_op.cea_ug_l is not None
    assert store.quarantined() == []
    assert "OP" in caplog.text  # control ids are logged ...
    for patient in manifest["patients"]:  # ... patient ids and names are not
        assert patient["patient_id"] not in caplog.text
    assert "SYNTHETIC" not in caplog.text


def test_newer_lab_is_preferred_and_later_one_ignored(listener: Hl7Listener,
                                                     store: ClinicalStore,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "labs.hl7"
    path.write_text("\n".join([lab_message("N2", cea="3.50", observed="20240515070000"),
                               lab_message("N1", cea="2.00", observed="20240105070000"),
                               lab_message("N3", cea="9.00", observed="20240605070000")]))
    acks = mllp_send_cli(path, listener.port)  # three messages on one connection
    assert [(a.code, a.control_id) for a in acks] == [("AA", "N2"), ("AA", "N1"), ("AA", "N3")]
    got = store.clinical_fields("PAT-1", "HOSP_A", BEFORE).cea_ug_l
    assert got is not None and (got.value, got.control_id) == (3.5, "N2")


MALFORMED = [
    pytest.param(b"\x00\xff\xfegarbage\x1c\x0b|||", "AR", "does not start with an MSH segment",
                 id="garbage"),
    pytest.param(b"PID|1||P^^^H^MR\rOBX|1|NM|2039-6^CEA^LN||1|ug/L|||||F\r", "AR",
                 "does not start with an MSH segment", id="no-msh"),
    pytest.param(lab_message("M3", cea="abc").encode(), "AE",
                 "OBX 1 (2039-6): OBX-5 value 'abc' is not a number", id="nm-abc"),
    pytest.param(lab_message("M4", unit="mmol/L").encode(), "AE",
                 "OBX-6 unit 'mmol/L' of CEA cannot be converted to ug/L", id="cea-mmol"),
    pytest.param(lab_message("M5", message_type="SIU^S12^SIU_S12").encode(), "AR",
                 "message type 'SIU^S12' (MSH-9) is not supported", id="siu"),
    pytest.param(lab_message("M6", issuer="").encode(), "AE",
                 "PID-3 identifier has no assigning authority (CX.4)", id="no-issuer"),
]


@pytest.mark.parametrize(("payload", "code", "reason"), MALFORMED)
def test_malformed_messages_get_ae_or_ar_and_the_listener_stays_up(
        listener: Hl7Listener, store: ClinicalStore, payload: bytes, code: str,
        reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    acks = send_raw(listener.port, frame(payload) + frame(lab_message("GOOD1")), 2)
    assert len(acks) == 2
    assert acks[0].code == code
    assert reason in acks[0].text
    assert acks[0].error_code.isdigit()
    assert (acks[1].code, acks[1].control_id) == ("AA", "GOOD1")
    kept = store.quarantined()
    assert len(kept) == 1 and kept[0].reason == acks[0].text and kept[0].ack_code == code
    assert mllp_send_cli(_write(store.path.parent / "after.hl7", lab_message("GOOD2")),
                         listener.port)[0].code == "AA"
    assert "PAT-1" not in caplog.text and "DOE" not in caplog.text


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_duplicate_over_mllp_is_acked_once_stored(listener: Hl7Listener, store: ClinicalStore,
                                                 tmp_path: Path) -> None:
    path = _write(tmp_path / "dup.hl7", lab_message("DUP1"))
    first, again = mllp_send_cli(path, listener.port), mllp_send_cli(path, listener.port)
    assert [a.code for a in first + again] == ["AA", "AA"]
    assert _stored(store.path, "DUP1") == 1


def test_store_commit_failure_gives_ae_never_aa(listener: Hl7Listener, store: ClinicalStore,
                                               tmp_path: Path) -> None:
    path = _write(tmp_path / "lab.hl7", lab_message("LOCK1"))
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database lock
    try:
        acks = mllp_send_cli(path, listener.port)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [a.code for a in acks] == ["AE"]
    assert "clinical store could not commit" in acks[0].text
    assert "database is locked" in acks[0].text
    assert _stored(store.path, "LOCK1") == 0
    assert [a.code for a in mllp_send_cli(path, listener.port)] == ["AA"]  # the sender retries
    assert _stored(store.path, "LOCK1") == 1


def test_too_large_message_is_rejected_then_the_connection_goes_on(store: ClinicalStore,
                                                                   ) -> None:
    settings = Hl7ListenerSettings(port=0, max_message_bytes=2000)
    big = lab_message("BIG1") + "NTE|1||" + "x" * 50_000 + "\r"
    with Hl7Listener(settings, store) as small:
        acks = send_raw(small.port, frame(big) + frame(lab_message("OK1")), 2)
    assert [(a.code, a.control_id) for a in acks] == [("AR", "BIG1"), ("AA", "OK1")]
    assert "larger than max_message_bytes (2000 bytes)" in acks[0].text
    kept = store.quarantined()
    assert len(kept) == 1 and kept[0].control_id == "BIG1"
    assert big.startswith(kept[0].raw) and len(kept[0].raw) == 2000


def test_bytes_outside_frames_are_skipped(listener: Hl7Listener) -> None:
    acks = send_raw(listener.port, b"noise\r\n" + frame(lab_message("J1")) + b"\n", 1)
    assert [(a.code, a.control_id) for a in acks] == [("AA", "J1")]


def test_framer_reassembles_frames_split_anywhere() -> None:
    framer = _Framer(max_bytes=100)
    stream = frame("MSH|one") + b"junk" + frame("MSH|two") + frame("x" * 300) + frame("MSH|3")
    out = [item for byte in stream for item in framer.feed(bytes([byte]))]
    assert out == [(b"MSH|one", False), (b"MSH|two", False), (b"x" * 100, True),
                   (b"MSH|3", False)]
    assert framer.junk == 4


def test_hosts_not_allowed_are_disconnected(store: ClinicalStore) -> None:
    settings = Hl7ListenerSettings(port=0, allowed_hosts=("192.0.2.0/24",))
    with Hl7Listener(settings, store) as guarded:
        try:
            acks = send_raw(guarded.port, frame(lab_message("H1")), 1)
        except ConnectionResetError:
            acks = []
    assert acks == []
    assert _stored(store.path, "H1") == 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=oncopacs-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_listener_accepts_tls_and_refuses_plain(store: ClinicalStore,
                                                   certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    settings = Hl7ListenerSettings(port=0, tls_cert_file=cert, tls_key_file=key)
    client = ssl.create_default_context(cafile=str(cert))
    with Hl7Listener(settings, store) as secure:
        acks = send_raw(secure.port, frame(lab_message("T1")), 1, context=client)
        with socket.create_connection(("127.0.0.1", secure.port), timeout=TIMEOUT_S) as plain:
            plain.sendall(frame(lab_message("T2")))
            try:
                plain_acks = read_acks(plain, 1)
            except ConnectionResetError:
                plain_acks = []
    assert [(a.code, a.control_id) for a in acks] == [("AA", "T1")]
    assert plain_acks == []
    assert (_stored(store.path, "T1"), _stored(store.path, "T2")) == (1, 0)


def test_stop_closes_open_connections(store: ClinicalStore) -> None:
    running = Hl7Listener(Hl7ListenerSettings(port=0), store).start()
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT_S) as idle:
        assert read_acks(_send(idle, lab_message("S1")), 1)[0].code == "AA"
        running.stop()
        assert idle.recv(100) == b""
    with pytest.raises(Hl7ListenerError, match="not started"):
        _ = running.port


def _send(sock: socket.socket, message: str) -> socket.socket:
    sock.sendall(frame(message))
    return sock


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra"):
        Hl7ListenerSettings(port=0, bind="0.0.0.0")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="given together"):
        Hl7ListenerSettings(tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="not an IP address"):
        Hl7ListenerSettings(allowed_hosts=("pacs.example",))
    assert [str(n) for n in Hl7ListenerSettings().networks()] == ["127.0.0.0/8", "::1/128"]
