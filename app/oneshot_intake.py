"""What the one-shot mode does at its edges: read the input folder, write the output folder.

- :func:`intake_folder` scans a folder of DICOM files (any layout, several studies),
  checks each file as the DICOM listener checks a C-STORE, puts the instances into
  the spool by study and series, records them in the job store (one job per study),
  and ingests the HL7 v2 files (``*.hl7``) into the clinical store so routing sees the
  patient's pathology and laboratory fields.
- :func:`deliver_to_folder` copies a finished job's result files to
  ``OUT/<StudyInstanceUID>/`` and ends the job as done.
- :func:`build_report` is ``OUT/report.json``: every job's state, pipeline, reason,
  files and stage timings, and every input file that was not used, with the reason.

Nothing here imports Holoscan: the operators in ``operators/folder_*.py`` call it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ImplicitVRLittleEndian, MediaStorageDirectoryStorage

from app.clinical import ClinicalStore, ClinicalStoreError, Hl7MessageError
from app.context import Services, StudyContext
from app.dicom_listener import check_instance
from app.jobs import JobStore
from app.spool import check_uid, make_dirs_durably, write_durably

log = logging.getLogger(__name__)

HL7_SUFFIX = ".hl7"
FOLDER_AET = "FOLDER"
"""The calling AE title the job store records for instances read from a folder."""
REPORT_NAME = "report.json"
OK_STATES = frozenset({"done", "unmatched"})
"""Job states of a successful run; failed, dead or unfinished jobs make it unsuccessful."""
MSH_RE = re.compile(r"^(?=MSH\|)", re.MULTILINE)


@dataclass(frozen=True)
class Skipped:
    """An input file that was not used, and why (the path is relative to the input)."""

    file: str
    reason: str


@dataclass
class Intake:
    """What :func:`intake_folder` found: the studies it opened jobs for, what it left out."""

    studies: list[str] = field(default_factory=list)
    instances: int = 0
    hl7_messages: int = 0
    skipped: list[Skipped] = field(default_factory=list)


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def read_instance(data: bytes) -> tuple[pydicom.Dataset | None, str]:
    """Parse one file's bytes and check it as the DICOM listener checks a C-STORE.

    The whole file is parsed (pixel data stays encoded bytes, never decoded), so a
    truncated file is caught as the listener catches a cut stream.

    Returns
    -------
    tuple of Dataset or None, and str
        The data set, or None and why the file cannot be used.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        return None, "not a DICOM Part 10 file (no DICM prefix)"
    except Exception as exc:  # pydicom raises many types on damaged files
        return None, f"DICOM file does not decode ({type(exc).__name__}: {exc})"
    if ds.file_meta.get("MediaStorageSOPClassUID", "") == MediaStorageDirectoryStorage:
        return None, "DICOMDIR (a media directory, not an instance)"
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return None, "DICOM file without SOP Class UID or SOP Instance UID"
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    try:
        rejection = check_instance(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    except Exception as exc:  # undecodable values, as the listener treats them
        return None, f"instance does not decode ({type(exc).__name__}: {exc})"
    if rejection is not None:
        return None, rejection.reason
    return ds, ""


def ingest_hl7_file(clinical: ClinicalStore, path: Path) -> tuple[int, list[str]]:
    """Ingest every HL7 v2 message of one file (one or more ``MSH`` segments).

    Returns
    -------
    tuple of int and list of str
        How many messages were committed, and why each other one was refused.
    """
    text = path.read_text(encoding="utf-8", errors="replace").strip("\x0b\x1c\r\n ")
    messages = [m.strip() for m in MSH_RE.split(text) if m.strip()]
    if not messages:
        return 0, ["no MSH segment: not an HL7 v2 message"]
    committed, refused = 0, []
    for message in messages:
        try:
            clinical.ingest(message)
            committed += 1
        except Hl7MessageError as exc:
            refused.append(f"HL7 message refused ({exc.ack_code}): {exc.reason}")
        except ClinicalStoreError as exc:
            refused.append(f"HL7 message not stored: {exc}")
    return committed, refused


def _store_instance(services: Services, data: bytes, ds: pydicom.Dataset, now: float) -> bool:
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    services.spool.store(study, series, sop, data)
    return services.jobs.record_instance(study, series, sop, FOLDER_AET, now)


def intake_folder(services: Services, folder: Path, exclude: Path | None = None) -> Intake:
    """Spool every usable DICOM instance below ``folder``, ingest its HL7 files, and queue
    one job per study (each job ``queued``, ready for :meth:`JobStore.claim_next`).

    HL7 files are ingested first, so the clinical store is complete before any study
    is routed. Files are read in sorted path order; files below ``exclude`` (the output
    folder, when it lies inside the input) are not read.

    Raises
    ------
    app.spool.SpoolError
        If a UID that passed the header check cannot be a spool path (not expected).
    OSError
        If the spool cannot be written (disk full, permissions).
    """
    intake = Intake()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not (exclude is not None and p.is_relative_to(exclude)))
    for path in (p for p in files if p.suffix.lower() == HL7_SUFFIX):
        committed, refused = ingest_hl7_file(services.clinical, path)
        intake.hl7_messages += committed
        intake.skipped += [Skipped(_relative(path, folder), r) for r in refused]
    for path in (p for p in files if p.suffix.lower() != HL7_SUFFIX):
        data = path.read_bytes()
        ds, reason = read_instance(data)
        if ds is None:
            intake.skipped.append(Skipped(_relative(path, folder), reason))
            continue
        if not _store_instance(services, data, ds, time.time()):
            intake.skipped.append(Skipped(_relative(path, folder), "repeats SOP Instance "
                                          f"UID {ds.SOPInstanceUID} of an earlier file"))
            continue
        intake.instances += 1
    for job in services.jobs.complete_quiet_studies(0.0, time.time()):
        services.jobs.enqueue(job.id, "pending")
        services.metrics.studies_received.inc()
        intake.studies.append(job.study_uid)
    log.info("input folder: %d instances in %d studies, %d HL7 messages, %d files left out",
             intake.instances, len(intake.studies), intake.hl7_messages, len(intake.skipped))
    return intake


def deliver_to_folder(services: Services, ctx: StudyContext, out: Path) -> None:
    """Copy the job's result files to ``out/<StudyInstanceUID>/`` and end the job as done.

    Raises
    ------
    app.spool.SpoolError
        If the Study Instance UID is malformed (it becomes a folder name).
    OSError
        If a file cannot be copied.
    """
    folder = out / check_uid(ctx.study_uid, "StudyInstanceUID")
    make_dirs_durably(folder)
    for path in ctx.result_files:
        write_durably(folder / path.name, path.read_bytes())
    for stage, seconds in ctx.timings.items():
        services.jobs.record_timing(ctx.job_id, stage, seconds)
    services.jobs.finish(ctx.job_id, "done", f"{len(ctx.result_files)} objects written to "
                         f"{folder.name}/")


def build_report(jobs: JobStore, intake: Intake, out: Path, **about: Any) -> dict[str, Any]:
    """The run's report: each job (state, pipeline, reason, files, timings) and each
    input file left out, with counts; ``about`` adds top-level fields (paths, seconds)."""
    studies = []
    for job in jobs.jobs():
        folder = out / job.study_uid
        files = sorted(_relative(p, out) for p in folder.glob("*.dcm")) \
            if job.state == "done" and folder.is_dir() else []
        studies.append({"study_uid": job.study_uid, "job_id": job.id, "state": job.state,
                        "pipeline": None if job.pipeline == "pending" else job.pipeline,
                        "reason": job.reason, "files": files,
                        "timings_s": {k: round(v, 3) for k, v in job.timings.items()}})
    counts = jobs.counts_by_state()
    return {**about, "ok": all(s["state"] in OK_STATES for s in studies),
            "jobs": {k: v for k, v in counts.items() if v}, "studies": studies,
            "instances": intake.instances, "hl7_messages": intake.hl7_messages,
            "skipped": [asdict(s) for s in intake.skipped]}


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write ``report`` as ``out/report.json`` (durably); returns the file.

    Raises
    ------
    OSError
        If the file cannot be written.
    """
    make_dirs_durably(out)
    path = out / REPORT_NAME
    write_durably(path, (json.dumps(report, indent=1) + "\n").encode())
    return path
