"""``oncopacs demo``: the PACS round trip on loopback, as a hospital would set it up.

1. starts Orthanc (DICOMweb, WSI plugins) with an auto-routing rule that forwards
   stable CT studies to oncopacs (``deploy/orthanc/forward-ct.lua``);
2. starts ``oncopacs serve`` exporting its results to that Orthanc;
3. generates a small synthetic cohort, stores the slides in Orthanc (the
   pathology archive), sends the HL7 to oncopacs over MLLP, then stores the CT
   studies in Orthanc, which forwards them;
4. waits for the SEG, SR and result card of every study and prints, per patient,
   what came back and where to look at it.

Orthanc and the service stay up until Ctrl-C (or stop at once with ``--no-wait``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import threading
from pathlib import Path
from typing import Any

import pydicom
import requests

from app.orthanc import Orthanc
from app.service_process import FORWARD_CT_LUA, Service, serve_config
from ml.errors import PeerError
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.synth.push import cstore_files, mllp_send_files

RESULT_TIMEOUT_S = 600.0


def add_parser(subs: Any) -> None:
    """Register ``demo`` on the top-level sub-parsers."""
    p = subs.add_parser("demo", help="run the PACS round trip against a real Orthanc",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=4, help="cohort size (default 4)")
    p.add_argument("--seed", type=int, default=1, help="cohort seed (default 1)")
    p.add_argument("--size", choices=["tiny", "default"], default="default")
    p.add_argument("--workdir", type=Path, help="folder for Orthanc, the service and the "
                   "cohort (default: a new temporary folder)")
    p.add_argument("--no-wait", action="store_true", help="stop everything and exit at once")
    p.set_defaults(run=run)


def _files(root: Path, folders: list[str]) -> list[Path]:
    return [p for f in folders for p in sorted((root / f).glob("*.dcm"))]


def _push(pacs: Orthanc, svc: Service, root: Path, manifest: dict[str, Any]) -> None:
    patients = manifest["patients"]
    slides = _files(root, [p["wsi"]["folder"] for p in patients if p["wsi"]])
    hl7 = [root / h for p in patients for h in p["hl7"]]
    ct = _files(root, [s["folder"] for p in patients for s in p["ct"]["series"]])
    for what, files in (("slides", slides), ("CT studies", ct)):
        report = cstore_files(files, pacs.host, pacs.dicom_port, pacs.aet)
        if report.failed:
            raise PeerError(f"Orthanc refused {len(report.failed)} {what}: {report.failed[:3]}")
        print(f"stored {report.sent} instances of {what} in Orthanc")
        if what == "slides":
            print(f"sent {len(mllp_send_files(hl7, '127.0.0.1', svc.hl7_port))} HL7 messages "
                  "to oncopacs")


def _results(pacs: Orthanc, study_uid: str) -> dict[str, dict[str, Any]]:
    return {s["MainDicomTags"].get("Modality", ""): s
            for s in pacs.find_series(StudyInstanceUID=study_uid)}


# Finding (DCM 121071) and Finding category (SCT 276214006) name what a group is about;
# every other coded CONTAINS item of a group is a qualitative evaluation.
_NOT_EVALUATIONS = {"121071", "276214006"}


def sr_findings(ds: pydicom.Dataset) -> list[str]:
    """``"<tracking id>: <concept> <value>"`` for every NUM and qualitative evaluation.

    Probabilities (UCUM ``{probability}``) print with three decimals, other
    measurements with one and their unit; qualitative evaluations print their coded
    meaning (risk group, TSR class, model inputs used and missing), repeated
    evaluations of one concept on one line.
    """
    found = []

    def walk(items: Any, tracking: str) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "TEXT" and name == "Tracking Identifier":
                tracking = str(item.TextValue)
            elif item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                number = float(value.NumericValue)
                text = f"{number:.3f}" if unit == "{probability}" else f"{number:.1f} {unit}"
                found.append(f"{tracking}: {name} {text}")
            elif (item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"
                  and item.ConceptNameCodeSequence[0].CodeValue not in _NOT_EVALUATIONS):
                meaning = item.ConceptCodeSequence[0].CodeMeaning
                head = f"{tracking}: {name}: "
                if found and found[-1].startswith(head):  # inputs used: one line
                    found[-1] += f", {meaning}"
                else:
                    found.append(head + meaning)
            if "ContentSequence" in item:
                walk(item.ContentSequence, tracking)

    walk(ds.get("ContentSequence", []), "")
    return found


def _slide_results(pacs: Orthanc, patient: dict[str, Any]) -> list[str]:
    """Model A's attention SEG in the patient's pathology study, if one was stored."""
    wsi = patient.get("wsi") or {}
    if not wsi.get("study_uid"):
        return []
    seg = _results(pacs, wsi["study_uid"]).get("SEG")
    if seg is None:
        return ["    no attention map in the slide study"]
    number = seg["MainDicomTags"].get("SeriesNumber", "?")
    return [f"    slide attention map (SEG series {number} in the pathology study "
            f"{wsi['study_uid']})"]


def _describe(pacs: Orthanc, results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for modality, what in (("SEG", "segmentation"), ("SR", "structured report"),
                           ("OT", "result card")):
        series = results[modality]
        data = requests.get(f"{pacs.http_url}/instances/{series['Instances'][0]}/file",
                            timeout=30).content
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        line = f"    {what} (series {ds.get('SeriesNumber', '?')})"
        if modality == "SEG":
            line += ": " + ", ".join(s.SegmentLabel for s in ds.SegmentSequence)
        lines.append(line)
        if modality == "SR":
            lines.extend(f"      {m}" for m in sr_findings(ds))
    return lines


def report(pacs: Orthanc, svc: Service, manifest: dict[str, Any]) -> str:
    """Per patient: the job's outcome, what came back into Orthanc and where to see it."""
    out = []
    for patient in manifest["patients"]:
        study_uid = patient["ct"]["study_uid"]
        jobs = svc.jobs(study_uid)
        outcome = " ".join(f"{j.state} {j.pipeline or '-'}" for j in jobs[-1:]) or "no job"
        out.append(f"{patient['patient_id']} ({patient['group']}, centre {patient['centre']})")
        out.append(f"  oncopacs: {outcome}")
        results = _results(pacs, study_uid)
        if all(m in results for m in ("SEG", "SR", "OT")):
            out.extend(_describe(pacs, results))
            out.extend(_slide_results(pacs, patient))
        else:
            out.append("    no results in Orthanc (see `oncopacs status` for the reason)")
        study = pacs.find_studies(StudyInstanceUID=study_uid)
        if study:
            out.append(f"  view: {pacs.http_url}/app/explorer.html#study?uuid={study[0]['ID']}")
    return "\n".join(out)


def _finished(svc: Service, manifest: dict[str, Any], pacs: Orthanc) -> bool:
    for patient in manifest["patients"]:
        uid = patient["ct"]["study_uid"]
        states = {j.state for j in svc.jobs(uid)}
        done_and_stored = "done" in states and "SR" in _results(pacs, uid)
        if not (done_and_stored or states & {"failed", "unmatched", "dead"}):
            return False
    return True


def run(args: argparse.Namespace) -> int:
    """Start Orthanc and the service, push the cohort, wait and print the results."""
    with contextlib.ExitStack() as stack:
        workdir: Path = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="oncopacs-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        pacs = stack.enter_context(Orthanc(workdir / "orthanc", stable_age_s=2,
                                           extra_config={"LuaScripts": [str(FORWARD_CT_LUA)]}))
        pacs.start()
        svc = Service(workdir, serve_config(workdir, pacs, quiet_s=3.0))
        stack.callback(svc.stop)
        svc.start()
        pacs.add_modality("oncopacs", svc.config["dicom"]["ae_title"], "127.0.0.1",
                          svc.dicom_port)
        print(f"Orthanc: {pacs.http_url} (DICOM {pacs.aet}@{pacs.host}:{pacs.dicom_port})")
        print(f"oncopacs: DICOM port {svc.dicom_port}, HL7 port {svc.hl7_port}, "
              f"{svc.http_url}/metrics, log {svc.log_path}")
        manifest = generate_cohort(CohortOptions(out=workdir / "cohort", patients=args.patients,
                                                 seed=args.seed, size=args.size, workers=2))
        _push(pacs, svc, workdir / "cohort", manifest)
        print("waiting for Orthanc to forward the studies and for oncopacs's results ...")
        svc.wait_for(lambda: _finished(svc, manifest, pacs), RESULT_TIMEOUT_S,
                     "results of every study")
        print(report(pacs, svc, manifest))
        if not args.no_wait:
            print("Orthanc and oncopacs keep running; press Ctrl-C to stop them.")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    return 0
