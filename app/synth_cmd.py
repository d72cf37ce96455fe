"""``oncopacs synth``: generate the synthetic cohort and optionally push it to peers."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ml.errors import ConfigError, PeerError
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


@dataclass(frozen=True)
class PushTargets:
    """Where ``--push`` sends the cohort, checked before anything is generated."""

    pacs: tuple[str, int] | None
    stow_url: str | None
    mllp: tuple[str, int] | None
    pacs_aet: str
    calling_aet: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PushTargets:
        """Parse and check the push options.

        Raises
        ------
        ConfigError
            If ``--push`` has no DICOM destination or an address is malformed.
        """
        if bool(args.pacs) == bool(args.stow_url):
            raise ConfigError("--push needs exactly one of --pacs HOST:PORT or --stow-url URL")
        return cls(pacs=_host_port(args.pacs, "--pacs") if args.pacs else None,
                   stow_url=args.stow_url,
                   mllp=_host_port(args.mllp, "--mllp") if args.mllp else None,
                   pacs_aet=args.pacs_aet, calling_aet=args.calling_aet)


def push(targets: PushTargets, manifest: dict[str, Any], root: Path) -> None:
    """Send a generated cohort to ``targets``.

    Raises
    ------
    PeerError
        If a peer is unreachable, refuses the association, or refuses instances.
    """
    dicom, hl7 = cohort_files(manifest, root)
    if targets.pacs is not None:
        report = cstore_files(dicom, *targets.pacs, targets.pacs_aet, targets.calling_aet)
    elif targets.stow_url is not None:
        report = stow_files(dicom, targets.stow_url)
    else:
        raise ConfigError("--push needs --pacs HOST:PORT or --stow-url URL")
    print(f"DICOM: {report.sent} instances sent, {len(report.failed)} failed")
    for line in report.failed:
        print(f"  failed: {line}", file=sys.stderr)
    if targets.mllp:
        acks = mllp_send_files(hl7, *targets.mllp)
        print(f"HL7: {len(acks)} messages acknowledged")
    if report.failed:
        raise PeerError(f"{len(report.failed)} DICOM instances were not accepted")


def run(args: argparse.Namespace) -> int:
    """Generate (and push) the cohort; print a one-line summary per group."""
    targets = PushTargets.from_args(args) if args.push else None
    opts = CohortOptions(out=args.out, patients=args.patients, seed=args.seed,
                         centres=args.centers, size=args.size, workers=args.workers)
    with tqdm(total=args.patients, unit="patient", disable=None) as bar:
        manifest = generate_cohort(opts, progress=lambda done: bar.update(done - bar.n))
    groups = [p["group"] for p in manifest["patients"]]
    print(f"{len(groups)} patients ({groups.count('CRC')} CRC, {groups.count('PDAC')} PDAC) "
          f"written to {args.out}; manifest {args.out / 'manifest.json'}")
    if targets is not None:
        push(targets, manifest, args.out)
    return 0
