"""Job store: received studies and their processing jobs in SQLite (WAL, synchronous=FULL).

States of a job::

    received --(quiet period)--> complete --enqueue(pipeline)--> queued --claim--> running
    complete | running --finish--> unmatched         running --finish--> done | failed | dead
    running --resume() after a crash--> queued (attempts + 1), or dead after max_attempts

- A job is opened in ``received`` by the first new instance of a study that has no
  ``received`` job; :meth:`JobStore.complete_quiet_studies` moves it to ``complete``
  once the study's last instance is ``quiet_s`` old, so each arrival episode becomes a
  job exactly once (a partial unique index allows one ``received`` job per study).
- A new instance that arrives after the study's job left ``received`` (whatever its
  state, finished or not) opens a new job; that job sees every spooled instance of the
  study. A repeated SOP Instance UID changes nothing (:meth:`JobStore.record_instance`
  is idempotent per SOP), so a PACS that re-sends a processed study does not trigger a
  second run; after :meth:`JobStore.release_study` (the spool removed the study) it does.
- Every commit is durable (``synchronous=FULL``) and transitions are single
  transactions, so the store survives kill -9; :meth:`JobStore.resume` on start puts
  jobs left ``running`` back in the queue.

Times are seconds since the epoch passed in by the caller (an injectable clock).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.errors import OncopacsError

log = logging.getLogger(__name__)

STATES = ("received", "complete", "queued", "running", "done", "failed", "unmatched", "dead")
FINAL_STATES = frozenset({"done", "failed", "unmatched", "dead"})
DEFAULT_MAX_ATTEMPTS = 3

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    calling_aet TEXT NOT NULL,
    first_instance_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    instance_count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s}'" for s in STATES)})),
    pipeline TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    timings TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_received ON jobs(study_uid) WHERE state = 'received';
"""


class JobStoreError(OncopacsError):
    """A job store operation named a job or state that does not allow it."""


@dataclass(frozen=True)
class Job:
    """One processing job of a study."""

    id: int
    study_uid: str
    state: str
    pipeline: str | None
    reason: str | None
    attempts: int
    created_at: float
    updated_at: float
    timings: dict[str, float]


@dataclass(frozen=True)
class StudyRecord:
    """What has been received of one study (over all its jobs)."""

    study_uid: str
    calling_aet: str
    first_instance_at: float
    last_instance_at: float
    instance_count: int


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], study_uid=row["study_uid"], state=row["state"],
               pipeline=row["pipeline"], reason=row["reason"], attempts=row["attempts"],
               created_at=row["created_at"], updated_at=row["updated_at"],
               timings=json.loads(row["timings"]))


class JobStore:
    """Studies received and their jobs, in one SQLite file shared by all threads.

    Parameters
    ----------
    path:
        The database file (created with its folder if missing).
    max_attempts:
        A job interrupted this many times (found ``running`` by :meth:`resume`) is
        ``dead`` instead of queued again, so a job that crashes the process cannot loop.
    clock:
        Seconds since the epoch, for methods called without ``now``.

    Raises
    ------
    JobStoreError
        If ``max_attempts`` is below 1.
    sqlite3.DatabaseError
        If ``path`` is not a SQLite database.
    """

    def __init__(self, path: Path, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 clock: Callable[[], float] = time.time) -> None:
        if max_attempts < 1:
            raise JobStoreError(f"max_attempts must be at least 1, got {max_attempts}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise JobStoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), committed durably or rolled back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def record_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                        calling_aet: str, now: float) -> bool:
        """Record one stored instance; returns False if ``sop_uid`` was already recorded.

        A new instance updates the study record and opens a ``received`` job for the
        study unless one is open. Returns only after the commit is on disk.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM instances WHERE sop_uid = ?",
                          (sop_uid,)).fetchone() is not None:
                return False
            db.execute(
                "INSERT INTO studies (study_uid, calling_aet, first_instance_at,"
                " last_instance_at, instance_count) VALUES (?, ?, ?, ?, 1)"
                " ON CONFLICT (study_uid) DO UPDATE SET calling_aet = excluded.calling_aet,"
                " last_instance_at = max(last_instance_at, excluded.last_instance_at),"
                " instance_count = instance_count + 1",
                (study_uid, calling_aet, now, now))
            db.execute("INSERT INTO instances (sop_uid, study_uid, series_uid, calling_aet,"
                       " received_at) VALUES (?, ?, ?, ?, ?)",
                       (sop_uid, study_uid, series_uid, calling_aet, now))
            db.execute(
                "INSERT INTO jobs (study_uid, state, created_at, updated_at)"
                " SELECT ?, 'received', ?, ? WHERE NOT EXISTS"
                " (SELECT 1 FROM jobs WHERE study_uid = ? AND state = 'received')",
                (study_uid, now, now, study_uid))
        return True

    def complete_quiet_studies(self, quiet_s: float, now: float) -> list[Job]:
        """Move ``received`` jobs whose study has been quiet ``quiet_s`` to ``complete``.

        Returns
        -------
        list of Job
            The jobs completed by this call (each job is returned by one call only).
        """
        with self._tx() as db:
            rows = db.execute(
                "UPDATE jobs SET state = 'complete', updated_at = ? WHERE state = 'received'"
                " AND study_uid IN (SELECT study_uid FROM studies WHERE last_instance_at <= ?)"
                " RETURNING *", (now, now - quiet_s)).fetchall()
        jobs = sorted((_job(r) for r in rows), key=lambda j: j.id)
        for job in jobs:
            log.info("job %d: study %s complete", job.id, job.study_uid)
        return jobs

    def _transition(self, job_id: int, allowed: tuple[str, ...], state: str,
                    sets: str, args: tuple[Any, ...]) -> Job:
        with self._tx() as db:
            row = db.execute(f"UPDATE jobs SET state = ?, {sets} WHERE id = ? AND state IN"  # noqa: S608
                             f" ({', '.join('?' * len(allowed))}) RETURNING *",
                             (state, *args, job_id, *allowed)).fetchone()
            if row is None:
                found = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                have = "no such job" if found is None else f"it is {found['state']}"
                raise JobStoreError(f"job {job_id} cannot become {state}: {have} "
                                    f"(allowed from {', '.join(allowed)})")
        log.info("job %d: %s", job_id, state)
        return _job(row)

    def enqueue(self, job_id: int, pipeline: str, now: float | None = None) -> Job:
        """Queue a ``complete`` job for ``pipeline`` (the router's decision).

        Raises
        ------
        JobStoreError
            If the job does not exist or is not ``complete``.
        """
        return self._transition(job_id, ("complete",), "queued",
                                "pipeline = ?, updated_at = ?", (pipeline, self._now(now)))

    def set_pipeline(self, job_id: int, pipeline: str) -> None:
        """Record the pipeline the router chose for a job.

        Raises
        ------
        JobStoreError
            If the job does not exist.
        """
        with self._tx() as db:
            if db.execute("UPDATE jobs SET pipeline = ? WHERE id = ?",
                          (pipeline, job_id)).rowcount == 0:
                raise JobStoreError(f"job {job_id} does not exist; cannot set its pipeline")

    def claim_next(self, now: float | None = None) -> Job | None:
        """Atomically move the oldest ``queued`` job to ``running`` and return it."""
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'running', updated_at = ? WHERE id ="
                " (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING *", (self._now(now),)).fetchone()
        if row is None:
            return None
        log.info("job %d: running", row["id"])
        return _job(row)

    def finish(self, job_id: int, state: str, reason: str | None = None,
               now: float | None = None) -> Job:
        """End a job: ``done``/``failed``/``dead`` from running or queued, ``unmatched``
        from complete or queued (the router found no pipeline).

        Raises
        ------
        JobStoreError
            If ``state`` is not a final state or the job is not in a state it can leave.
        """
        if state not in FINAL_STATES:
            raise JobStoreError(f"finish() needs one of {sorted(FINAL_STATES)}, got {state!r}")
        allowed = ("complete", "queued", "running") if state == "unmatched" \
            else ("running", "queued")
        return self._transition(job_id, allowed, state, "reason = ?, updated_at = ?",
                                (reason, self._now(now)))

    def record_timing(self, job_id: int, stage: str, seconds: float) -> None:
        """Store how long ``stage`` took for a job (seconds), in its timings JSON.

        Raises
        ------
        JobStoreError
            If the job does not exist.
        """
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET timings = json_set(timings, '$.' || json_quote(?),"
                             " ?) WHERE id = ?", (stage, seconds, job_id))
            if cur.rowcount == 0:
                raise JobStoreError(f"job {job_id} does not exist; cannot record {stage!r}")

    def resume(self, now: float | None = None) -> list[Job]:
        """On start: put every ``running`` job back in the queue, counting an attempt.

        A job that reaches ``max_attempts`` becomes ``dead`` instead. Returns the jobs
        changed.
        """
        now = self._now(now)
        with self._tx() as db:
            rows = db.execute(
                "UPDATE jobs SET attempts = attempts + 1, updated_at = ?,"
                " state = CASE WHEN attempts + 1 >= ? THEN 'dead' ELSE 'queued' END,"
                " reason = CASE WHEN attempts + 1 >= ?"
                " THEN 'interrupted ' || (attempts + 1) || ' times' ELSE reason END"
                " WHERE state = 'running' RETURNING *",
                (now, self.max_attempts, self.max_attempts)).fetchall()
        jobs = sorted((_job(r) for r in rows), key=lambda j: j.id)
        for job in jobs:
            log.warning("job %d: was running at shutdown, now %s (attempt %d)",
                        job.id, job.state, job.attempts)
        return jobs

    def release_study(self, study_uid: str) -> int:
        """Forget a study's instances (after the spool removed it); returns how many.

        A later re-send of the same instances then opens a new job.
        """
        with self._tx() as db:
            return db.execute("DELETE FROM instances WHERE study_uid = ?",
                              (study_uid,)).rowcount

    def job(self, job_id: int) -> Job | None:
        """One job by id, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, state: str | None = None) -> list[Job]:
        """Every job (or those in ``state``), oldest first.

        Raises
        ------
        JobStoreError
            If ``state`` is not a job state.
        """
        if state is not None and state not in STATES:
            raise JobStoreError(f"unknown job state {state!r}; states are {', '.join(STATES)}")
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id",
                                        (state,)).fetchall()
        return [_job(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero if none)."""
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def study(self, study_uid: str) -> StudyRecord | None:
        """What has been received of ``study_uid``, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM studies WHERE study_uid = ?",
                                   (study_uid,)).fetchone()
        return None if row is None else StudyRecord(**dict(row))

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` answer (``'ok'`` when intact)."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])
