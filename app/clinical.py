"""The clinical store: HL7 v2 demographics and results in SQLite, and the fields model A reads.

:class:`ClinicalStore` keeps patients (keyed on PID-3 identifier and its assigning
authority), every accepted message (raw text, control id, sender), the observations
it carried and the messages it rejected (quarantine, with the reason). ``ingest``
parses and validates a message (:mod:`app.hl7_parse`, with hl7apy) and commits it in
one transaction; a caller that acknowledges only after ``ingest`` returned never
acknowledges a lost message.

Times are compared as written by the sender (HL7 TS without its UTC offset), which
is the local time of the hospital that sent them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from app.hl7_parse import (
    CA19_9,
    CEA,
    LOINC,
    M_CATEGORY,
    N_CATEGORY,
    STAGE_GROUP,
    T_CATEGORY,
    TUMOUR_SITE,
    ClinicalError,
    Hl7MessageError,
    ParsedMessage,
    PatientIdentity,
    parse_hl7,
)

__all__ = [
    "ClinicalError",
    "ClinicalFields",
    "ClinicalStore",
    "ClinicalStoreError",
    "Hl7MessageError",
    "IngestResult",
    "Observed",
    "QuarantineEntry",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

FINAL_STATUSES = ("F", "C", "U")  # HL7 table 0085: final, corrected, changed to final

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY,
    identifier TEXT NOT NULL,
    issuer TEXT NOT NULL,
    family_name TEXT, given_name TEXT, sex TEXT, birth_date TEXT,
    demographics_at TEXT, demographics_control_id TEXT,
    UNIQUE (identifier, issuer));
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    control_id TEXT NOT NULL,
    sending_app TEXT NOT NULL,
    sending_facility TEXT NOT NULL,
    message_type TEXT NOT NULL,
    message_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    raw TEXT NOT NULL,
    UNIQUE (sending_app, sending_facility, control_id));
CREATE TABLE IF NOT EXISTS observations (
    id INTEGER PRIMARY KEY,
    patient_id INTEGER NOT NULL REFERENCES patients(id),
    message_id INTEGER NOT NULL REFERENCES messages(id),
    control_id TEXT NOT NULL,
    set_id TEXT, code TEXT NOT NULL, code_system TEXT NOT NULL, name TEXT,
    value_type TEXT NOT NULL, value_numeric REAL, value_code TEXT, value_text TEXT,
    value_system TEXT, unit TEXT, unit_as_sent TEXT,
    observed_at TEXT NOT NULL, result_status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS observations_lookup
    ON observations (patient_id, code_system, code, observed_at);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    ack_code TEXT NOT NULL,
    reason TEXT NOT NULL,
    control_id TEXT,
    raw TEXT NOT NULL);
"""


class ClinicalStoreError(ClinicalError):
    """The clinical store could not read or commit (disk, lock, corrupt database)."""


@dataclass(frozen=True)
class IngestResult:
    """What :meth:`ClinicalStore.ingest` did with one message.

    ``duplicate`` is true when the same sender had already sent this control id with
    the same content: nothing new was written.
    """

    control_id: str
    message_type: str
    sending_app: str
    sending_facility: str
    observations: int
    duplicate: bool


@dataclass(frozen=True)
class Observed(Generic[T]):
    """One clinical value, when it was observed and which message carried it."""

    value: T
    observed_at: dt.datetime
    control_id: str


@dataclass(frozen=True)
class ClinicalFields:
    """The clinical inputs of model A for one patient; a field is None when unknown.

    ``t``, ``n``, ``m`` and ``stage_group`` are AJCC codes as sent (``pT3``, ``pN1``,
    ``cM0``, ``III``); ``cea_ug_l`` in ug/L; ``ca19_9_u_ml`` in U/mL; ``age_years``
    whole years at the requested date; ``sex`` PID-8 (HL7 table 0001). ``age_years``
    and ``sex`` carry the time and control id of the latest demographics (PID) received.
    ``site`` is the primary tumour site (LOINC 21905-5) when a message coded it.
    """

    t: Observed[str] | None = None
    n: Observed[str] | None = None
    m: Observed[str] | None = None
    stage_group: Observed[str] | None = None
    cea_ug_l: Observed[float] | None = None
    ca19_9_u_ml: Observed[float] | None = None
    age_years: Observed[int] | None = None
    sex: Observed[str] | None = None
    site: Observed[str] | None = None

    @property
    def missing(self) -> list[str]:
        """Names of the fields that are None."""
        return [f.name for f in fields(self) if getattr(self, f.name) is None]


@dataclass(frozen=True)
class QuarantineEntry:
    """A rejected message as kept by the store."""

    received_at: dt.datetime
    ack_code: str
    reason: str
    control_id: str | None
    raw: str


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="microseconds")


class ClinicalStore:
    """HL7 v2 clinical data in one SQLite file (WAL, ``synchronous=FULL``); thread-safe.

    Parameters
    ----------
    path
        The database file; created with its folder if missing.
    busy_timeout_s
        How long a write waits for another process's lock before it fails.

    Raises
    ------
    ClinicalStoreError
        If the database cannot be opened or its schema created.
    """

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s,
                                         isolation_level=None, check_same_thread=False)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ClinicalStoreError(f"clinical store {self.path}: journal mode is {mode}, "
                                         "WAL is needed")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ClinicalStoreError(f"cannot open clinical store {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ClinicalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def ingest(self, message_text: str) -> IngestResult:
        """Parse, validate and commit one HL7 v2 message (segments separated by CR or LF).

        A message the store refuses is quarantined with the reason before the error
        is raised. Returns only after the commit is durable.

        Raises
        ------
        Hl7MessageError
            If the message is unparseable or unsupported (``ack_code`` AR) or its
            content is not acceptable (AE), including a control id that this sender
            already used for different content.
        ClinicalStoreError
            If the database could not commit (the message is not stored).
        """
        try:
            parsed = parse_hl7(message_text)
            result = self._commit(parsed, message_text)
        except Hl7MessageError as exc:
            self._quarantine_quietly(message_text, exc.reason, exc.ack_code, exc.control_id)
            raise
        logger.info("HL7 %s %s from %s/%s: %s, %d observations", result.control_id,
                    result.message_type, result.sending_app, result.sending_facility,
                    "duplicate" if result.duplicate else "committed", result.observations)
        return result

    def quarantine(self, raw: str, reason: str, ack_code: str,
                   control_id: str | None = None) -> None:
        """Keep a rejected message with the reason it was rejected.

        Raises
        ------
        ClinicalStoreError
            If the database could not commit.
        """
        with self._lock:
            try:
                self._conn.execute(
                    "INSERT INTO quarantine (received_at, ack_code, reason, control_id, raw) "
                    "VALUES (?, ?, ?, ?, ?)", (_now(), ack_code, reason, control_id, raw))
            except sqlite3.Error as exc:
                raise ClinicalStoreError(f"clinical store {self.path} cannot quarantine "
                                         f"message {control_id or '(no control id)'}: {exc}"
                                         ) from exc
        logger.warning("HL7 %s quarantined (%s): %s", control_id or "(no control id)",
                       ack_code, reason)

    def _quarantine_quietly(self, raw: str, reason: str, ack_code: str,
                            control_id: str | None) -> None:
        try:
            self.quarantine(raw, reason, ack_code, control_id)
        except ClinicalStoreError as exc:
            logger.error("HL7 %s rejected (%s) and NOT quarantined: %s",
                         control_id or "(no control id)", ack_code, exc)

    def _commit(self, msg: ParsedMessage, raw: str) -> IngestResult:
        digest = hashlib.sha256(raw.encode("utf-8", errors="surrogateescape")).hexdigest()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    count = self._write(msg, raw, digest)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                if count is not None:
                    self._conn.execute("COMMIT")
                else:
                    self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:  # a failed COMMIT can leave it open
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise ClinicalStoreError(f"clinical store {self.path} could not commit HL7 "
                                         f"message {msg.control_id}: {exc}") from exc
        return IngestResult(msg.control_id, msg.message_type, msg.sending_app,
                            msg.sending_facility, count or 0, count is None)

    def _write(self, msg: ParsedMessage, raw: str, digest: str) -> int | None:
        """Insert the message; None when it is a duplicate of one already stored."""
        row = self._conn.execute(
            "SELECT sha256 FROM messages WHERE sending_app=? AND sending_facility=? "
            "AND control_id=?", (msg.sending_app, msg.sending_facility, msg.control_id),
        ).fetchone()
        if row is not None:
            if row[0] == digest:
                return None
            raise Hl7MessageError(
                f"control id {msg.control_id} from {msg.sending_app}/{msg.sending_facility} "
                "was already received with different content", ack_code="AE",
                error_code="205", control_id=msg.control_id, location="MSH^1^10")
        cur = self._conn.execute(
            "INSERT INTO messages (control_id, sending_app, sending_facility, message_type, "
            "message_at, received_at, sha256, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (msg.control_id, msg.sending_app, msg.sending_facility, msg.message_type,
             msg.message_at.isoformat(), _now(), digest, raw))
        message_id = cur.lastrowid
        keys = [self._upsert_patient(p, msg) for p in msg.patients]
        for obs in msg.observations:
            self._conn.execute(
                "INSERT INTO observations (patient_id, message_id, control_id, set_id, code, "
                "code_system, name, value_type, value_numeric, value_code, value_text, "
                "value_system, unit, unit_as_sent, observed_at, result_status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (keys[obs.patient], message_id, msg.control_id, obs.set_id, obs.code,
                 obs.code_system, obs.name, obs.value_type, obs.numeric, obs.coded, obs.text,
                 obs.value_system, obs.unit, obs.unit_as_sent, obs.observed_at.isoformat(),
                 obs.status))
        return len(msg.observations)

    def _upsert_patient(self, p: PatientIdentity, msg: ParsedMessage) -> int:
        self._conn.execute("INSERT INTO patients (identifier, issuer) VALUES (?, ?) "
                           "ON CONFLICT (identifier, issuer) DO NOTHING",
                           (p.identifier, p.issuer))
        key, known_at = self._conn.execute(
            "SELECT id, demographics_at FROM patients WHERE identifier=? AND issuer=?",
            (p.identifier, p.issuer)).fetchone()
        when = msg.message_at.isoformat()
        if known_at is None or when >= known_at:
            birth = p.birth_date.isoformat() if p.birth_date else None
            self._conn.execute(
                "UPDATE patients SET family_name=COALESCE(?, family_name), "
                "given_name=COALESCE(?, given_name), sex=COALESCE(?, sex), "
                "birth_date=COALESCE(?, birth_date), demographics_at=?, "
                "demographics_control_id=? WHERE id=?",
                (p.family_name, p.given_name, p.sex, birth, when, msg.control_id, key))
        return int(key)

    # ------------------------------------------------------------------ reading

    def clinical_fields(self, identifier: str, issuer: str,
                        before: dt.datetime) -> ClinicalFields:
        """The latest final values observed strictly before ``before`` (naive local time).

        The patient is matched on identifier AND issuer. Age is counted at ``before``
        from the birth date; sex and birth date are the latest demographics received.
        An unknown patient gives a :class:`ClinicalFields` with every field None.

        Raises
        ------
        ClinicalStoreError
            If the database cannot be read.
        """
        try:
            with self._lock:
                row = self._conn.execute(
                    "SELECT id, sex, birth_date, demographics_at, demographics_control_id "
                    "FROM patients WHERE identifier=? AND issuer=?",
                    (identifier, issuer)).fetchone()
                if row is None:
                    return ClinicalFields()
                key = int(row[0])
                coded = {name: self._latest(key, code, before, "value_code")
                         for name, code in (("t", T_CATEGORY), ("n", N_CATEGORY),
                                            ("m", M_CATEGORY), ("stage_group", STAGE_GROUP))}
                site = self._latest(key, TUMOUR_SITE, before,
                                    "COALESCE(value_text, value_code)")
                cea = self._latest(key, CEA, before, "value_numeric")
                ca19_9 = self._latest(key, CA19_9, before, "value_numeric")
        except sqlite3.Error as exc:
            raise ClinicalStoreError(f"clinical store {self.path} cannot be read: {exc}") from exc
        demographics_at = dt.datetime.fromisoformat(row[3]) if row[3] else before
        sex = Observed(str(row[1]), demographics_at, str(row[4])) if row[1] else None
        age = None
        if row[2]:
            born = dt.date.fromisoformat(row[2])
            years = before.year - born.year - ((before.month, before.day) < (born.month, born.day))
            age = Observed(years, demographics_at, str(row[4]))
        return ClinicalFields(
            t=_as(coded["t"], str), n=_as(coded["n"], str), m=_as(coded["m"], str),
            stage_group=_as(coded["stage_group"], str), cea_ug_l=_as(cea, float),
            ca19_9_u_ml=_as(ca19_9, float), age_years=age, sex=sex, site=_as(site, str))

    def _latest(self, key: int, code: str, before: dt.datetime,
                column: str) -> tuple[Any, str, str] | None:
        # column is one of this module's literals, never caller input
        sql = (f"SELECT {column}, observed_at, control_id FROM observations "  # noqa: S608
               f"WHERE patient_id=? AND code_system=? AND code=? AND observed_at<? "
               f"AND {column} IS NOT NULL AND result_status IN "
               f"({', '.join('?' * len(FINAL_STATUSES))}) "
               f"ORDER BY observed_at DESC, id DESC LIMIT 1")
        row = self._conn.execute(sql, (key, LOINC, code, before.isoformat(),
                                       *FINAL_STATUSES)).fetchone()
        return None if row is None else (row[0], str(row[1]), str(row[2]))

    def quarantined(self) -> list[QuarantineEntry]:
        """Every rejected message kept so far, oldest first.

        Raises
        ------
        ClinicalStoreError
            If the database cannot be read.
        """
        try:
            with self._lock:
                rows = self._conn.execute("SELECT received_at, ack_code, reason, control_id, "
                                          "raw FROM quarantine ORDER BY id").fetchall()
        except sqlite3.Error as exc:
            raise ClinicalStoreError(f"clinical store {self.path} cannot be read: {exc}") from exc
        return [QuarantineEntry(dt.datetime.fromisoformat(r[0]), r[1], r[2], r[3], r[4])
                for r in rows]


def _as(row: tuple[Any, str, str] | None, kind: Callable[[Any], T]) -> Observed[T] | None:
    if row is None:
        return None
    return Observed(kind(row[0]), dt.datetime.fromisoformat(row[1]), row[2])
