"""Durable spool of received DICOM instances, with a quarantine for rejected data.

Layout below the spool root::

    <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   accepted instances
    quarantine/<time>-<random>.dcm + .json                         rejected data + reason

An instance is written to a hidden temporary file in its series folder, the file is
fsynced, renamed over its final name (``os.replace``, atomic) and the folder is
fsynced, so once :meth:`Spool.store` returns the instance survives a crash or a power
cut. Storing the same SOP Instance UID again replaces the file (idempotent). Folders
are created with an fsync of their parent. Temporary files left by a crash were never
acknowledged to the sender; :class:`Spool` removes them when it opens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.errors import OncopacsError

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
SUFFIX = ".dcm"
TMP_PREFIX = ".tmp-"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_CHARS = 64


class SpoolError(OncopacsError):
    """The spool could not store, list or remove something (names the UID or file)."""


def check_uid(value: str, what: str) -> str:
    """Return ``value`` if it is a well-formed DICOM UID, safe to use as a file name.

    Raises
    ------
    SpoolError
        If ``value`` is empty, longer than 64 characters or not dotted digits.
    """
    if not value or len(value) > UID_MAX_CHARS or not UID_RE.match(value):
        raise SpoolError(f"{what} {value!r} is not a valid DICOM UID "
                         f"(dotted digits, at most {UID_MAX_CHARS} characters)")
    return value


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new, renamed or removed files) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync).

    Raises
    ------
    OSError
        If any step fails; the temporary file is removed and ``path`` is unchanged.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def make_dirs_durably(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each parent after a child is made."""
    if path.is_dir():
        return
    make_dirs_durably(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    fsync_dir(path.parent)


@dataclass(frozen=True)
class QuarantineRecord:
    """One rejected object: where its bytes are and why it was rejected."""

    data_path: Path
    reason: str
    calling_aet: str
    received_at: str
    size_bytes: int
    sha256: str


class Spool:
    """Accepted instances by study and series, and a quarantine, below ``root``.

    Parameters
    ----------
    root:
        The spool folder; created (durably) if missing.

    Raises
    ------
    SpoolError
        If ``root`` exists and is not a folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise SpoolError(f"spool root {self.root} exists and is not a folder")
        make_dirs_durably(self.root)
        self.quarantine_dir = self.root / QUARANTINE
        make_dirs_durably(self.quarantine_dir)
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Remove what a crash left: unacknowledged partial files, half-removed studies."""
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            log.warning("finishing the removal of %s interrupted by a crash", tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)
        for pattern in (f"*/*/{TMP_PREFIX}*", f"{QUARANTINE}/{TMP_PREFIX}*"):
            for tmp in self.root.glob(pattern):
                log.warning("removing partial file %s left by a crash", tmp.name)
                tmp.unlink(missing_ok=True)

    def path_of(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where the instance ``sop_uid`` is (or would be) stored.

        Raises
        ------
        SpoolError
            If a UID is malformed (it becomes a file name).
        """
        return (self.root / check_uid(study_uid, "StudyInstanceUID")
                / check_uid(series_uid, "SeriesInstanceUID")
                / f"{check_uid(sop_uid, 'SOPInstanceUID')}{SUFFIX}")

    def store(self, study_uid: str, series_uid: str, sop_uid: str,
              data: bytes | memoryview) -> Path:
        """Store one encoded DICOM file durably; replaces an earlier copy of ``sop_uid``.

        Returns
        -------
        Path
            The stored file.

        Raises
        ------
        SpoolError
            If a UID is malformed.
        OSError
            If the disk write fails (full disk, I/O error, permissions); nothing is
            left behind and an earlier copy of the instance is unchanged.
        """
        path = self.path_of(study_uid, series_uid, sop_uid)
        make_dirs_durably(path.parent)
        write_durably(path, data)
        return path

    def quarantine(self, data: bytes | memoryview, reason: str, calling_aet: str) -> Path:
        """Keep rejected ``data`` with a JSON sidecar saying why; returns the data file.

        Raises
        ------
        OSError
            If the disk write fails.
        """
        now = dt.datetime.now(dt.UTC)
        stem = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}"
        data_path = self.quarantine_dir / f"{stem}{SUFFIX}"
        write_durably(data_path, data)
        sidecar = {"reason": reason, "calling_aet": calling_aet,
                   "received_at": now.isoformat(), "size_bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(), "data_file": data_path.name}
        write_durably(data_path.with_suffix(".json"),
                      json.dumps(sidecar, indent=1).encode())
        return data_path

    def quarantined(self) -> list[QuarantineRecord]:
        """Every quarantined object, oldest first."""
        records = []
        for sidecar in sorted(self.quarantine_dir.glob("*.json")):
            meta: dict[str, Any] = json.loads(sidecar.read_text())
            records.append(QuarantineRecord(
                data_path=sidecar.with_suffix(SUFFIX), reason=meta["reason"],
                calling_aet=meta["calling_aet"], received_at=meta["received_at"],
                size_bytes=meta["size_bytes"], sha256=meta["sha256"]))
        return records

    def studies(self) -> list[str]:
        """Study Instance UIDs with at least one folder in the spool, sorted."""
        return sorted(p.name for p in self._dirs(self.root) if p.name != QUARANTINE)

    def series(self, study_uid: str) -> list[str]:
        """Series Instance UIDs of ``study_uid`` in the spool, sorted (empty if none)."""
        folder = self.root / check_uid(study_uid, "StudyInstanceUID")
        return sorted(p.name for p in self._dirs(folder))

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[Path]:
        """Stored files of a study (or of one of its series), sorted by path."""
        series = [series_uid] if series_uid is not None else self.series(study_uid)
        files: list[Path] = []
        for uid in series:
            folder = (self.root / check_uid(study_uid, "StudyInstanceUID")
                      / check_uid(uid, "SeriesInstanceUID"))
            if folder.is_dir():
                files += [p for p in folder.iterdir()
                          if p.suffix == SUFFIX and not p.name.startswith(TMP_PREFIX)]
        return sorted(files)

    def remove_study(self, study_uid: str) -> int:
        """Delete a finished study's folder; returns how many instances it held.

        Raises
        ------
        SpoolError
            If the study is not in the spool.
        """
        folder = self.root / check_uid(study_uid, "StudyInstanceUID")
        if not folder.is_dir():
            raise SpoolError(f"study {study_uid} is not in the spool {self.root}")
        count = len(self.instances(study_uid))
        # Rename first so a crash never leaves a half-deleted study that looks complete.
        doomed = self.root / f"{TMP_PREFIX}{study_uid}.{secrets.token_hex(4)}"
        os.replace(folder, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed)
        log.info("removed study %s (%d instances) from the spool", study_uid, count)
        return count

    @staticmethod
    def _dirs(folder: Path) -> Iterator[Path]:
        if folder.is_dir():
            yield from (p for p in folder.iterdir()
                        if p.is_dir() and not p.name.startswith(TMP_PREFIX))
