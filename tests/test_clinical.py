"""The clinical store on a real SQLite file: ingest, validation, identity, pre-operative fields.

The MLLP path (real ``mllp_send`` peer) is in ``test_hl7_listener.py``.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.clinical import ClinicalStore, ClinicalStoreError, Hl7MessageError
from ml.synth.centres import centres
from ml.synth.hl7gen import write_hl7
from ml.synth.latent import sample_patient
from tests.clinical_helpers import lab_message, pathology_message

SEED = 97
BEFORE = dt.datetime(2024, 6, 1)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[ClinicalStore]:
    with ClinicalStore(tmp_path / "clinical" / "store.db") as opened:
        yield opened


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the database through a connection of its own (what another process sees)."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_generator_messages_give_the_latent_fields(store: ClinicalStore,
                                                   tmp_path: Path) -> None:
    for index in (0, 1):
        spec = sample_patient(SEED, index, centres(3))
        for path in write_hl7(spec, SEED, tmp_path / str(index)):
            result = store.ingest(path.read_bytes().decode("ascii"))
            assert not result.duplicate
        after = dt.datetime.combine(spec.surgery_date + dt.timedelta(days=30), dt.time())
        got = store.clinical_fields(spec.patient_id, spec.issuer, after)
        assert got.cea_ug_l is not None and got.ca19_9_u_ml is not None
        assert got.cea_ug_l.value == pytest.approx(spec.latent.cea_ug_l, abs=0.005)
        assert got.ca19_9_u_ml.value == pytest.approx(spec.latent.ca19_9_u_ml, abs=0.05)
        assert got.cea_ug_l.observed_at.date() == spec.lab_date
        assert got.sex is not None and got.sex.value == spec.sex
        assert got.age_years is not None
        assert got.age_years.value == (after.date() - spec.birth_date).days * 100 // 36525
        if spec.group == "CRC":
            crc = spec.crc
            assert got.t is not None and got.t.value == f"pT{crc.t_stage}"
            assert got.n is not None and got.n.value == f"pN{crc.n_stage}"
            assert got.m is not None and got.m.value == "cM0"
            assert got.stage_group is not None and got.stage_group.value == crc.stage_group
            assert got.t.observed_at.date() == spec.surgery_date
            assert got.site is not None and got.site.value == crc.site
        else:
            assert got.t is None and got.n is None and got.stage_group is None
            assert set(got.missing) == {"t", "n", "m", "stage_group", "site"}


def test_latest_value_before_the_date_wins(store: ClinicalStore) -> None:
    store.ingest(lab_message("L2", cea="5.50", observed="20240520080000"))
    store.ingest(lab_message("L1", cea="3.00", observed="20240110080000"))  # older, sent later
    store.ingest(lab_message("L3", cea="9.00", observed="20240701080000"))  # after BEFORE
    got = store.clinical_fields("PAT-1", "HOSP_A", BEFORE)
    assert got.cea_ug_l is not None
    assert (got.cea_ug_l.value, got.cea_ug_l.control_id) == (5.5, "L2")
    assert got.cea_ug_l.observed_at == dt.datetime(2024, 5, 20, 8)
    earlier = store.clinical_fields("PAT-1", "HOSP_A", dt.datetime(2024, 5, 20, 8))
    assert earlier.cea_ug_l is not None and earlier.cea_ug_l.control_id == "L1"
    assert store.clinical_fields("PAT-1", "HOSP_A", dt.datetime(2024, 1, 1)).cea_ug_l is None


def test_preliminary_results_are_not_used_and_corrections_are(store: ClinicalStore) -> None:
    store.ingest(lab_message("F1", cea="3.00", observed="20240110080000"))
    store.ingest(lab_message("P1", cea="7.00", observed="20240111080000", status="P"))
    got = store.clinical_fields("PAT-1", "HOSP_A", BEFORE).cea_ug_l
    assert got is not None and got.control_id == "F1"
    store.ingest(lab_message("C1", cea="3.30", observed="20240110080000", status="C"))
    got = store.clinical_fields("PAT-1", "HOSP_A", BEFORE).cea_ug_l
    assert got is not None and (got.value, got.control_id) == (3.3, "C1")


@pytest.mark.parametrize(("unit", "sent", "ug_l"), [
    ("ug/L", "4.20", 4.2), ("ng/mL", "4.20", 4.2), ("\u00b5g/L", "4.20", 4.2),
    ("ng/L", "4200", 4.2), ("mg/L", "0.0042", 4.2),
])
def test_cea_units_are_converted_to_ug_per_l(store: ClinicalStore, unit: str, sent: str,
                                             ug_l: float) -> None:
    store.ingest(lab_message("U1", cea=sent, unit=unit))
    got = store.clinical_fields("PAT-1", "HOSP_A", BEFORE).cea_ug_l
    assert got is not None and got.value == pytest.approx(ug_l)
    assert _rows(store.path, "SELECT unit, unit_as_sent FROM observations WHERE code='2039-6'"
                 ) == [("ug/L", unit)]


@pytest.mark.parametrize(("message", "code", "reason"), [
    (lab_message("B1", unit="mmol/L"), "AE", "OBX-6 unit 'mmol/L' of CEA cannot be converted "
                                              "to ug/L"),
    (lab_message("B2", unit=""), "AE", "OBX-6 unit of CEA is empty"),
    (lab_message("B3", cea="abc"), "AE", "OBX-5 value 'abc' is not a number"),
    (lab_message("B4", cea="-1"), "AE", "CEA value -1 is negative"),
    (lab_message("B5", value_type="ST"), "AE", "CEA must be sent as NM, not ST"),
    (lab_message("B6", value_type="ED"), "AE", "OBX-2 value type 'ED' is not supported"),
    (lab_message("B7", status="Q"), "AE", "OBX-11 result status 'Q' is not in HL7 table 0085"),
    (lab_message("B8", cea=""), "AE", "OBX-5 (observation value) is empty but OBX-11 is 'F'"),
    (lab_message("B9", issuer=""), "AE", "PID-3 identifier has no assigning authority"),
    (lab_message("B10", observed="2024-01-10"), "AR", "MSH-7 (message date/time) '2024-01-10'"),
    (lab_message("B16").replace("19600315", "1960-03-15"), "AE",
     "PID-7 (date of birth) is not an HL7 date/time"),
    (lab_message("B11", message_type="SIU^S12"), "AR", "message type 'SIU^S12' (MSH-9) is "
                                                       "not supported"),
    (lab_message(""), "AR", "MSH-10 (message control id) is empty"),
    (pathology_message("B12", t="pT9"), "AE", "OBX-5 code 'pT9' is not an AJCC T category"),
    (pathology_message("B13", stage="V"), "AE", "'V' is not an AJCC stage group"),
    ("PID|1||X^^^H\rOBX|1|NM|2039-6^CEA^LN||1|ug/L\r", "AR", "does not start with an MSH"),
    ("MSH|^~\\&|A|B|C|D|20240101||ADT^A04|B14|P|2.5\rEVN|A04\r", "AE", "has no PID segment"),
    ("MSH|^~\\&|A|B|C|D|20240101||ORU^R01|B15|P|9.9\r", "AR", "hl7apy cannot parse"),
    ("\x00\x17garbage\xff", "AR", "does not start with an MSH"),
])
def test_bad_messages_are_refused_and_quarantined(store: ClinicalStore, message: str,
                                                  code: str, reason: str) -> None:
    with pytest.raises(Hl7MessageError) as raised:
        store.ingest(message)
    assert raised.value.ack_code == code
    assert reason in raised.value.reason
    assert raised.value.error_code.isdigit()
    assert _rows(store.path, "SELECT count(*) FROM messages") == [(0,)]
    assert _rows(store.path, "SELECT count(*) FROM observations") == [(0,)]
    kept = store.quarantined()
    assert len(kept) == 1
    assert (kept[0].ack_code, kept[0].reason, kept[0].raw) == (code, raised.value.reason,
                                                               message)


def test_identity_is_identifier_and_issuer(store: ClinicalStore) -> None:
    store.ingest(lab_message("I1", issuer="HOSP_A", cea="1.00"))
    store.ingest(lab_message("I2", issuer="HOSP_B", cea="8.00"))
    a = store.clinical_fields("PAT-1", "HOSP_A", BEFORE).cea_ug_l
    b = store.clinical_fields("PAT-1", "HOSP_B", BEFORE).cea_ug_l
    assert a is not None and (a.value, a.control_id) == (1.0, "I1")
    assert b is not None and (b.value, b.control_id) == (8.0, "I2")
    unknown = store.clinical_fields("PAT-1", "HOSP_C", BEFORE)
    assert len(unknown.missing) == 9
    assert _rows(store.path, "SELECT identifier, issuer FROM patients ORDER BY issuer") == [
        ("PAT-1", "HOSP_A"), ("PAT-1", "HOSP_B")]


def test_duplicates_are_idempotent_per_sender(store: ClinicalStore) -> None:
    message = lab_message("D1")
    first, again = store.ingest(message), store.ingest(message)
    assert (first.duplicate, first.observations) == (False, 2)
    assert (again.duplicate, again.observations) == (True, 0)
    assert _rows(store.path, "SELECT count(*) FROM observations") == [(2,)]
    other_sender = store.ingest(lab_message("D1", sender=("LIS2", "SITE2")))
    assert not other_sender.duplicate
    with pytest.raises(Hl7MessageError, match="D1 from LIS/SITE1 was already received with "
                                              "different content") as raised:
        store.ingest(lab_message("D1", cea="9.99"))
    assert raised.value.ack_code == "AE"
    assert _rows(store.path, "SELECT count(*) FROM messages") == [(2,)]
    assert _rows(store.path, "SELECT count(*) FROM observations") == [(4,)]


def test_pathology_fields_and_coded_site(store: ClinicalStore) -> None:
    store.ingest(pathology_message("P1", site="Sigmoid colon"))
    got = store.clinical_fields("PAT-1", "HOSP_A", BEFORE)
    assert [f.value for f in (got.t, got.n, got.m, got.stage_group, got.site) if f] == [
        "pT3", "pN1a", "cM0", "IIIB", "Sigmoid colon"]
    assert got.cea_ug_l is None and got.missing == ["cea_ug_l", "ca19_9_u_ml"]


def test_line_feed_separators_and_escapes(store: ClinicalStore) -> None:
    text = lab_message("E1").replace("\r", "\n").replace("CEA^LN", "C\\S\\EA^LN")
    assert store.ingest(text).observations == 2
    assert _rows(store.path, "SELECT name FROM observations WHERE code='2039-6'") == [("C^EA",)]


def test_committed_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with ClinicalStore(path) as first:
        first.ingest(lab_message("R1"))
    assert _rows(path, "PRAGMA journal_mode") == [("wal",)]
    with ClinicalStore(path) as again:
        got = again.clinical_fields("PAT-1", "HOSP_A", BEFORE)
        assert got.cea_ug_l is not None and got.cea_ug_l.control_id == "R1"
        assert again.ingest(lab_message("R1")).duplicate


def test_a_locked_database_fails_the_commit_and_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with ClinicalStore(path, busy_timeout_s=0.2) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            with pytest.raises(ClinicalStoreError, match=r"could not commit HL7 message K1: "
                                                         r"database is locked"):
                store.ingest(lab_message("K1"))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert _rows(path, "SELECT count(*) FROM messages") == [(0,)]
        assert not store.ingest(lab_message("K1")).duplicate
        assert _rows(path, "SELECT control_id FROM messages") == [("K1",)]
