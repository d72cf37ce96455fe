"""Helpers of tests/test_oneshot.py: run the one-shot mode, run serve's steps, read results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom import examples
from pydicom.uid import generate_uid

from app.config import parse_config
from app.context import StudyContext
from app.dicom_listener import DicomListener
from app.serve import CHAIN, open_services
from tests.tools import free_port, run_dcmtk

RUN_TIMEOUT_S = 600
SENDER_AET = "STORESCU"


def run_python(args: list[str], *, env: Mapping[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with the stack Holoscan needs (``ulimit -s 32768``)."""
    quoted = " ".join(f"'{a}'" for a in args)
    return subprocess.run(
        ["bash", "-c", f'ulimit -s 32768 2>/dev/null; exec "{sys.executable}" {quoted}'],
        capture_output=True, text=True, check=False, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd)


def copy_ct(root: Path, patient: dict[str, Any], dest: Path, *, flat: bool) -> None:
    """Copy a patient's CT series below ``dest``: one folder per series, or every file
    flat in ``dest`` under a new name (the one-shot mode must not care)."""
    for series in patient["ct"]["series"]:
        src = root / series["folder"]
        if flat:
            dest.mkdir(parents=True, exist_ok=True)
            for f in src.glob("*.dcm"):
                shutil.copyfile(f, dest / f"{patient['index']}-{series['phase']}-{f.name}")
        else:
            shutil.copytree(src, dest / series["phase"])


def copy_hl7(root: Path, patient: dict[str, Any], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for rel in patient["hl7"]:
        shutil.copyfile(root / rel, dest / f"{patient['index']}-{Path(rel).name}")


def write_mr(path: Path) -> str:
    """An MR instance in a study of its own; returns its Study Instance UID."""
    mr = examples.mr
    mr.StudyInstanceUID, mr.SeriesInstanceUID = generate_uid(), generate_uid()
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mr.save_as(path, enforce_file_format=True)
    return str(mr.StudyInstanceUID)


def serve_mode_results(state: Path, root: Path, patient: dict[str, Any]) -> dict[str, Path]:
    """One study through serve's ingest and steps: its HL7 into the clinical store, its CT
    by storescu into a real DICOM listener, then each serve operator's step function in
    serve's order (CHAIN, ending with the export that queues and finishes the job)."""
    settings = parse_config({
        "dicom": {"ae_title": "ONCOPACS", "port": 0, "quiet_period_s": 0,
                  "allowed_peers": [{"ae_title": SENDER_AET, "host": "127.0.0.1"}]},
        "storage": {"root": str(state)},
        "destinations": [{"name": "pacs", "kind": "c-store", "host": "127.0.0.1",
                          "port": free_port(), "called_aet": "PACS"}]})
    services = open_services(settings)
    try:
        for rel in patient["hl7"]:
            services.clinical.ingest((root / rel).read_text())
        with DicomListener(settings.dicom, services.spool, services.jobs) as listener:
            folders = [str(root / s["folder"]) for s in patient["ct"]["series"]]
            run_dcmtk("storescu", "-aet", SENDER_AET, "-aec", "ONCOPACS", "+sd",
                      "127.0.0.1", str(listener.port), *folders)
            for job in listener.poll_completed():
                services.jobs.enqueue(job.id, "pending")
        claimed = services.jobs.claim_next()
        assert claimed is not None and claimed.study_uid == patient["ct"]["study_uid"]
        ctx: StudyContext | None = StudyContext(claimed.id, claimed.study_uid)
        for cls in CHAIN:
            assert ctx is not None, f"the job ended before {cls.stage}"
            ctx = cls.run(services, ctx)
        finished = services.jobs.job(claimed.id)
        assert finished is not None and finished.state == "done", finished
        folder = services.results_dir / f"job-{claimed.id}"
        return {name: folder / f"{name}.dcm" for name in ("seg", "sr", "card")}
    finally:
        services.outbox.close()
        services.clinical.close()
        services.jobs.close()


def sr_values(sr: pydicom.Dataset) -> list[tuple[str, str, str]]:
    """Every NUM (path, value, unit) and CODE (path, meaning, "") content item of an SR."""
    found: list[tuple[str, str, str]] = []

    def walk(items: Any, path: str) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning \
                if "ConceptNameCodeSequence" in item else "?"
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                found.append((path + name, str(value.NumericValue),
                              value.MeasurementUnitsCodeSequence[0].CodeValue))
            elif item.ValueType == "CODE":
                found.append((path + name, item.ConceptCodeSequence[0].CodeMeaning, ""))
            if "ContentSequence" in item:
                walk(item.ContentSequence, f"{path}{name}/")

    walk(sr.ContentSequence, "")
    return found


def seg_summary(seg: pydicom.Dataset) -> tuple[list[tuple[Any, ...]], list[list[str]]]:
    """Segments (number, label, property code) and each frame's source CT instance."""
    segments = [(int(s.SegmentNumber), str(s.SegmentLabel),
                 str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue))
                for s in seg.SegmentSequence]
    sources = [[str(src.ReferencedSOPInstanceUID) for d in f.DerivationImageSequence
                for src in d.SourceImageSequence]
               for f in seg.PerFrameFunctionalGroupsSequence]
    return segments, sources
