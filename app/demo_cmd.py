"""``oncopacs demo``: a real Orthanc PACS on loopback receiving a synthetic cohort.

It starts Orthanc (DICOMweb and WSI plugins) on free loopback ports, generates a
small cohort, sends it with C-STORE and prints, per patient, what Orthanc holds
and where to look at it. Orthanc stays up until Ctrl-C (or exits at once with
``--no-wait``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
from pathlib import Path
from typing import Any

from app.orthanc import Orthanc
from ml.errors import PeerError
from ml.synth.cohort import CohortOptions, cohort_files, generate_cohort
from ml.synth.push import cstore_files


def add_parser(subs: Any) -> None:
    """Register ``demo`` on the top-level sub-parsers."""
    p = subs.add_parser("demo", help="run the demo against a real Orthanc on loopback",
                        description=__doc__)
    p.add_argument("--patients", type=int, default=4, help="cohort size (default 4)")
    p.add_argument("--seed", type=int, default=1, help="cohort seed (default 1)")
    p.add_argument("--size", choices=["tiny", "default"], default="default")
    p.add_argument("--workdir", type=Path, help="folder for Orthanc and the cohort "
                   "(default: a new temporary folder)")
    p.add_argument("--no-wait", action="store_true", help="stop Orthanc and exit at once")
    p.set_defaults(run=run)


def _series_lines(server: Orthanc, study_uid: str) -> list[str]:
    lines = []
    found = server.find_series(StudyInstanceUID=study_uid)
    for series in sorted(found, key=lambda s: int(s["MainDicomTags"].get("SeriesNumber", 0))):
        tags = series["MainDicomTags"]
        count = len(series.get("Instances", []))
        line = (f"    {tags.get('Modality', '?'):3} series {tags.get('SeriesNumber', '?'):>3} "
                f"{tags.get('SeriesDescription', '')!r}: {count} instances")
        if tags.get("Modality") == "SM":
            line += f"\n        slide viewer: {server.http_url}/wsi/app/viewer.html" \
                    f"?series={series['ID']}"
        lines.append(line)
    return lines


def report(server: Orthanc, manifest: dict[str, Any]) -> str:
    """What Orthanc holds for each patient of ``manifest``, as printable text."""
    out = []
    for patient in manifest["patients"]:
        pid = patient["patient_id"]
        out.append(f"{pid} ({patient['group']}, centre {patient['centre']})")
        studies = [patient["ct"]["study_uid"]]
        if patient["wsi"] is not None:
            studies.append(patient["wsi"]["study_uid"])
        for uid in studies:
            found = server.find_studies(StudyInstanceUID=uid)
            if not found:
                out.append(f"  study {uid}: NOT in Orthanc")
                continue
            desc = found[0]["MainDicomTags"].get("StudyDescription", "")
            out.append(f"  study {uid} {desc!r}")
            out.append(f"    explorer: {server.http_url}/app/explorer.html#study?uuid="
                       f"{found[0]['ID']}")
            out.extend(_series_lines(server, uid))
        out.append(f"  HL7 messages written: {len(patient['hl7'])} (delivered to oncopacs's "
                   "HL7 listener once `oncopacs serve` exists)")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Start Orthanc, generate and push the cohort, print what arrived."""
    with contextlib.ExitStack() as stack:
        workdir: Path = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="oncopacs-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(Orthanc(workdir / "orthanc"))
        server.start()
        print(f"Orthanc is up: {server.http_url} (DICOM {server.aet}@{server.host}:"
              f"{server.dicom_port}, DICOMweb {server.dicomweb_url})")
        opts = CohortOptions(out=workdir / "cohort", patients=args.patients, seed=args.seed,
                             size=args.size, workers=2)
        manifest = generate_cohort(opts)
        dicom, _ = cohort_files(manifest, opts.out)
        sent = cstore_files(dicom, server.host, server.dicom_port, server.aet)
        print(f"sent {sent.sent} DICOM instances to Orthanc, {len(sent.failed)} refused")
        if sent.failed:
            raise PeerError(f"Orthanc refused {len(sent.failed)} instances: {sent.failed[:3]}")
        print(report(server, manifest))
        if not args.no_wait:
            print("Orthanc keeps running; press Ctrl-C to stop it.")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    return 0
