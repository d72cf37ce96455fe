"""Durable export outbox: result files wait in SQLite until the PACS has accepted every one.

An :class:`Outbox` is one SQLite database in WAL mode with ``synchronous=FULL``:
a committed row survives a crash or ``kill -9``. Each item is a job's result files
for one destination. :meth:`Outbox.attempt` hands the files not yet accepted to a
:class:`Sender`; the item is ``accepted`` only when every file is. A retryable
failure (peer down, association lost, out-of-resources status) leaves it
``pending`` with a next-attempt time after an exponential back-off with bounded
jitter; a permanent failure, or ``max_attempts`` failed attempts, moves it to
``dead`` with the last error, where an operator can :meth:`Outbox.requeue` it.

Files are referenced, not copied: :meth:`Outbox.enqueue` fsyncs each file and its
folder, and the caller must keep them until the item leaves ``pending``.

Resending is harmless: a crash between a peer's acceptance and the commit sends the
file again, and a PACS keys instances by SOP Instance UID (Orthanc overwrites an
instance it already has; it does not duplicate it).

Statuses: C-STORE 0x0000 and warnings 0xB000-0xBFFF are accepted.
:data:`PERMANENT_STATUSES` (0x0122 SOP class not supported, 0x0124 not authorised,
0xA900-0xA9FF data set does not match SOP class, 0xC000-0xCFFF cannot understand)
and no accepted presentation context are permanent: resending the same bytes cannot
succeed. Every other status, and any connection or association failure, is
retryable. STOW-RS: HTTP 400, 401, 403, 409, 413 and 415 are permanent, other HTTP
errors and connection failures retryable; per-instance failure reasons in the
response follow the C-STORE classes.

Logs and errors name job ids, item ids, SOP Instance UIDs and file names only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app.export_senders import (
    CStoreSender,
    DestinationSettings,
    FileOutcome,
    SendError,
    StowSender,
    make_sender,
)
from app.spool import fsync_dir
from ml.errors import OncopacsError

logger = logging.getLogger(__name__)

State = Literal["pending", "accepted", "dead"]
STATES: tuple[State, ...] = ("pending", "accepted", "dead")

__all__ = ["STATES", "CStoreSender", "DestinationSettings", "ExportError", "ExportSettings",
           "FileOutcome", "Item", "Outbox", "SendError", "Sender", "State", "StowSender",
           "make_sender"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    accepted TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'accepted', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
"""


class ExportError(OncopacsError):
    """The outbox was given something it cannot keep (a missing file, a conflicting item)."""


class ExportSettings(BaseModel):
    """Retry policy of the outbox (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_attempts: int = Field(default=10, ge=1)
    base_delay_s: float = Field(default=5.0, gt=0)
    max_delay_s: float = Field(default=900.0, gt=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    """Each delay is drawn from [(1 - jitter) * d, d], d = min(max, base * 2**(n - 1))."""


class Sender(Protocol):
    """Sends files to one destination; one :class:`FileOutcome` per file, in order.

    Raises :class:`SendError` when nothing could be sent (peer unreachable).
    """

    @property
    def description(self) -> str: ...

    def send(self, files: Sequence[Path]) -> list[FileOutcome]: ...


@dataclass(frozen=True)
class Item:
    """One job's result files for one destination, and where their delivery stands."""

    id: int
    job_id: str
    destination: str
    files: tuple[Path, ...]
    accepted: frozenset[Path]
    state: State
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    updated_at: float

    @property
    def remaining(self) -> tuple[Path, ...]:
        """Files the destination has not accepted yet."""
        return tuple(f for f in self.files if f not in self.accepted)


def _fsync(files: Iterable[Path]) -> None:
    """Make the files and their folder entries durable."""
    folders = set()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(path.parent)
    for folder in folders:
        fsync_dir(folder)


class Outbox:
    """A durable export queue in one SQLite file; a context manager.

    Parameters
    ----------
    path
        The database file (created with its folder if needed).
    settings
        Retry policy.
    clock
        Seconds since the epoch; tests pass a fake clock so no test sleeps.
    rng
        Source of jitter.

    One process drives :meth:`attempt` for an item at a time; reading (``due``,
    ``counts``) is safe from any thread or process.
    """

    def __init__(self, path: Path, settings: ExportSettings | None = None, *,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.path = path
        self.settings = settings or ExportSettings()
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---------------------------------------------------------------- queue
    def enqueue(self, job_id: str, files: Sequence[Path], destination: str) -> Item:
        """Queue ``files`` (by reference) for ``destination``, due at once.

        Enqueueing the same job for the same destination again returns the
        existing item, so a restarted job does not send twice.

        Raises
        ------
        ExportError
            If ``files`` is empty, a file does not exist, or the job already has an
            item for ``destination`` with other files.
        """
        if not files:
            raise ExportError(f"job {job_id}: no files to export to {destination}")
        paths = tuple(Path(f).resolve() for f in files)
        if missing := [p.name for p in paths if not p.is_file()]:
            raise ExportError(f"job {job_id}: result files {missing} do not exist")
        _fsync(paths)
        now = self.clock()
        encoded = json.dumps([str(p) for p in paths])
        with self._lock:
            self._db.execute(
                "INSERT INTO outbox (job_id, destination, files, next_attempt_at, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, destination) "
                "DO NOTHING", (job_id, destination, encoded, now, now, now))
            row = self._db.execute("SELECT * FROM outbox WHERE job_id = ? AND destination = ?",
                                   (job_id, destination)).fetchone()
        item = _item(row)
        if item.files != paths:
            raise ExportError(f"job {job_id} already has outbox item {item.id} for "
                              f"{destination} with other files")
        logger.info("outbox item %d: job %s, %d files for %s", item.id, job_id, len(paths),
                    destination)
        return item

    def get(self, item_id: int) -> Item:
        """The item with this id.

        Raises
        ------
        ExportError
            If there is no such item.
        """
        with self._lock:
            row = self._db.execute("SELECT * FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise ExportError(f"outbox {self.path} has no item {item_id}")
        return _item(row)

    def for_job(self, job_id: str) -> list[Item]:
        """Every item queued for a job, whatever its state."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM outbox WHERE job_id = ? ORDER BY id",
                                    (job_id,)).fetchall()
        return [_item(row) for row in rows]

    def due(self, now: float | None = None) -> list[Item]:
        """Pending items whose next attempt is at or before ``now`` (default: the clock)."""
        moment = self.clock() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id", (moment,)).fetchall()
        return [_item(row) for row in rows]

    def counts(self) -> dict[State, int]:
        """Number of items in each state (every state present)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")
            found = {str(state): int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in STATES}

    def dead_letters(self) -> list[Item]:
        """Items given up on, with their last error."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM outbox WHERE state = 'dead' ORDER BY id")
            return [_item(row) for row in rows.fetchall()]

    def requeue(self, item_id: int) -> Item:
        """Make a dead item pending again, due now, with its attempt count reset.

        Raises
        ------
        ExportError
            If there is no such item or it is not dead.
        """
        item = self.get(item_id)
        if item.state != "dead":
            raise ExportError(f"outbox item {item_id} is {item.state}, not dead")
        self._update(item.id, state="pending", attempts=0, next_attempt_at=self.clock())
        return self.get(item_id)

    # -------------------------------------------------------------- delivery
    def delay_s(self, attempts: int) -> float:
        """Back-off after ``attempts`` failed attempts, jittered within the settings' bounds."""
        s = self.settings
        ceiling = min(s.max_delay_s, s.base_delay_s * 2.0 ** max(attempts - 1, 0))
        return ceiling * (1.0 - s.jitter * self.rng.random())

    def attempt(self, item: Item, sender: Sender) -> Item:
        """Send the item's remaining files once and record the outcome.

        Returns
        -------
        Item
            ``accepted`` when every file is; ``pending`` with a later
            ``next_attempt_at`` after a retryable failure; ``dead`` after a permanent
            failure or the last allowed attempt. An item that is no longer pending
            is returned unchanged.
        """
        item = self.get(item.id)
        if item.state != "pending":
            return item
        if gone := [p for p in item.remaining if not p.is_file()]:
            outcomes = [FileOutcome(p, False, f"result file {p.name} is missing", True)
                        for p in gone]
        else:
            try:
                outcomes = sender.send(item.remaining)
            except SendError as exc:
                outcomes = [FileOutcome(p, False, str(exc), exc.permanent)
                            for p in item.remaining]
            except OSError as exc:  # a socket or file error the sender did not wrap
                outcomes = [FileOutcome(p, False, f"{sender.description}: {exc}")
                            for p in item.remaining]
        return self._record(item, outcomes, sender.description)

    def _record(self, item: Item, outcomes: Sequence[FileOutcome], peer: str) -> Item:
        accepted = set(item.accepted) | {o.path for o in outcomes if o.accepted}
        failures = [o for o in outcomes if not o.accepted]
        attempts = item.attempts + 1
        files_json = json.dumps(sorted(str(p) for p in accepted))
        if not failures and accepted >= set(item.files):
            self._update(item.id, state="accepted", attempts=attempts, accepted=files_json,
                         next_attempt_at=None, last_error=None)
            logger.info("outbox item %d (job %s) accepted by %s", item.id, item.job_id, peer)
            return self.get(item.id)
        error = f"{peer}: {_summary([str(o.error) for o in failures])}"
        permanent = any(o.permanent for o in failures)
        if permanent or attempts >= self.settings.max_attempts:
            why = "permanent failure" if permanent else f"{attempts} attempts"
            self._update(item.id, state="dead", attempts=attempts, accepted=files_json,
                         next_attempt_at=None, last_error=f"{why}: {error}")
            logger.error("outbox item %d (job %s) dead after %s: %s", item.id, item.job_id,
                         why, error)
            return self.get(item.id)
        delay = self.delay_s(attempts)
        self._update(item.id, attempts=attempts, accepted=files_json,
                     next_attempt_at=self.clock() + delay, last_error=error)
        logger.warning("outbox item %d (job %s) attempt %d failed, retry in %.1f s: %s",
                       item.id, item.job_id, attempts, delay, error)
        return self.get(item.id)

    def _update(self, item_id: int, **values: object) -> None:
        values["updated_at"] = self.clock()
        columns = ", ".join(f"{name} = ?" for name in values)  # names are ours, not input
        with self._lock:
            self._db.execute(f"UPDATE outbox SET {columns} WHERE id = ?",  # noqa: S608
                             (*values.values(), item_id))


def _summary(errors: Sequence[str], shown: int = 5) -> str:
    """Distinct errors in order, each with its file count when above one."""
    counts = dict.fromkeys(errors, 0)
    for error in errors:
        counts[error] += 1
    parts = [f"{e} ({n} files)" if n > 1 else e for e, n in list(counts.items())[:shown]]
    more = len(counts) - shown
    return "; ".join(parts) + (f"; and {more} other errors" if more > 0 else "")


def _item(row: sqlite3.Row) -> Item:
    return Item(id=int(row["id"]), job_id=str(row["job_id"]),
                destination=str(row["destination"]),
                files=tuple(Path(p) for p in json.loads(row["files"])),
                accepted=frozenset(Path(p) for p in json.loads(row["accepted"])),
                state=row["state"], attempts=int(row["attempts"]),
                next_attempt_at=row["next_attempt_at"], last_error=row["last_error"],
                created_at=float(row["created_at"]), updated_at=float(row["updated_at"]))
