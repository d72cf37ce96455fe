"""``oncopacs synth``: generate the synthetic cohort and optionally push it to peers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ml.errors import ConfigError
from ml.synth.cohort import CohortOptions, cohort_files, generate_cohort
from ml.synth.push import cstore_files, mllp_send_files, stow_files


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} must be HOST:PORT, got {text!r}")
    return host, int(port)


def add_parser(subs: Any) -> None:
    """Register ``synth`` on the top-level sub-parsers."""
    p = subs.add_parser("synth", help="generate a synthetic multimodal cohort",
                        description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    p.add_argument("--patients", type=int, required=True, help="number of patients")
    p.add_argument("--seed", type=int, required=True, help="random seed (same seed, same bytes)")
    p.add_argument("--centers", type=int, default=3, help="number of centres (1-6)")
    p.add_argument("--size", choices=["tiny", "default"], default="default",
                   help="image sizes: tiny for tests, default for realistic studies")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores)")
    push = p.add_argument_group("push (with --push)")
    push.add_argument("--push", action="store_true",
                      help="send the DICOM to a PACS and the HL7 to an MLLP endpoint")
    push.add_argument("--pacs", metavar="HOST:PORT", help="C-STORE destination")
    push.add_argument("--pacs-aet", default="ORTHANC", help="called AE title of the PACS")
    push.add_argument("--calling-aet", default="ONCOPACS_SYN", help="our AE title")
    push.add_argument("--stow-url", help="DICOMweb root; STOW-RS instead of C-STORE")
    push.add_argument("--mllp", metavar="HOST:PORT", help="MLLP endpoint for the HL7")
    p.set_defaults(run=run)


def push(args: argparse.Namespace, manifest: dict[str, Any]) -> None:
    """Send a generated cohort to the peers named in ``args``."""
    dicom, hl7 = cohort_files(manifest, args.out)
    if args.stow_url:
        report = stow_files(dicom, args.stow_url)
    elif args.pacs:
        host, port = _host_port(args.pacs, "--pacs")
        report = cstore_files(dicom, host, port, args.pacs_aet, args.calling_aet)
    else:
        raise ConfigError("--push needs --pacs HOST:PORT or --stow-url URL")
    print(f"DICOM: {report.sent} instances sent, {len(report.failed)} failed")
    for line in report.failed:
        print(f"  failed: {line}", file=sys.stderr)
    if args.mllp:
        host, port = _host_port(args.mllp, "--mllp")
        acks = mllp_send_files(hl7, host, port)
        print(f"HL7: {len(acks)} messages acknowledged")
    if report.failed:
        raise ConfigError(f"{len(report.failed)} DICOM instances were not accepted")


def run(args: argparse.Namespace) -> int:
    """Generate (and push) the cohort; print a one-line summary per group."""
    if args.push and not (args.pacs or args.stow_url):
        raise ConfigError("--push needs --pacs HOST:PORT or --stow-url URL")
    opts = CohortOptions(out=args.out, patients=args.patients, seed=args.seed,
                         centres=args.centers, size=args.size, workers=args.workers)
    with tqdm(total=args.patients, unit="patient", disable=None) as bar:
        manifest = generate_cohort(opts, progress=lambda done: bar.update(done - bar.n))
    groups = [p["group"] for p in manifest["patients"]]
    print(f"{len(groups)} patients ({groups.count('CRC')} CRC, {groups.count('PDAC')} PDAC) "
          f"written to {args.out}; manifest {args.out / 'manifest.json'}")
    if args.push:
        push(args, manifest)
    return 0
