"""Benchmark: study turnaround of ``oncopacs serve`` and its peak memory.

    python bench/turnaround_bench.py [--patients 3] [--seed 2026] [--quiet-s 5]

Starts a real Orthanc (the PACS, holding the CRC slides) and ``oncopacs serve`` as a
subprocess exporting to it, sends the HL7 of every patient over MLLP, then sends each
default-size synthetic CT study with dcmtk ``storescu`` straight to oncopacs, one study
at a time, and polls Orthanc's REST API every ``--poll-s`` seconds until the study holds
a SEG and an SR series. Prints, per study and as median / max:

- turnaround: from storescu's exit (the last instance acknowledged) to the SEG and SR
  found in Orthanc, with the quiet period included and excluded (the service waits
  ``--quiet-s`` after the last instance before it treats the study as complete);
- the per-stage durations the service recorded in its job store (``timings``);
- the peak resident memory (``VmHWM``) of the service process and of any child
  process it started, sampled while the run goes on and read again at the end.

The figures depend on the machine (CPU cores, load): the run prints both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.export import Outbox
from app.jobs import JobStore
from app.orthanc import Orthanc
from app.service_process import SENDER_AET, SERVE_AET, Service, serve_config
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.synth.push import cstore_files, mllp_send_files

RESULT_TIMEOUT_S = 600.0
ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk 3.6.7 leaves Nagle on otherwise


def dcmtk(name: str) -> str:
    """dcmtk's program (pynetdicom's console scripts of the same name shadow it on PATH)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    raise SystemExit(f"dcmtk {name} not found; install the Debian package dcmtk")


def _kib(status: Path, key: str) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


@dataclass
class MemoryWatch:
    """Peak resident memory (VmHWM, KiB) of a process and each descendant seen."""

    pid: int
    peak_kib: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        for pid in (self.pid, *_children(self.pid)):
            hwm = _kib(Path(f"/proc/{pid}/status"), "VmHWM")
            if hwm:
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)
                if pid not in self.names:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                        self.names[pid] = " ".join(c.decode() for c in cmd[:4] if c)[:60]
                    except OSError:
                        self.names[pid] = "?"


def send_study(port: int, root: Path, patient: dict[str, Any]) -> float:
    """storescu the study's CT series to oncopacs; returns the wall clock at its exit."""
    folders = [str(root / s["folder"]) for s in patient["ct"]["series"]]
    proc = subprocess.run([dcmtk("storescu"), "-aet", SENDER_AET, "-aec", SERVE_AET, "+sd",
                           "+r", "+sp", "*.dcm", "127.0.0.1", str(port), *folders],
                          capture_output=True, text=True, check=False, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}):\n{proc.stderr}")
    return time.time()


def wait_results(pacs: Orthanc, svc: Service, study_uid: str, poll_s: float,
                 memory: MemoryWatch) -> float:
    """Poll Orthanc until the study holds SEG and SR; returns the wall clock then."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        modalities = {s["MainDicomTags"].get("Modality")
                      for s in pacs.find_series(StudyInstanceUID=study_uid)}
        if {"SEG", "SR"} <= modalities:
            return time.time()
        if svc.proc is not None and svc.proc.poll() is not None:
            raise SystemExit(f"oncopacs serve exited:\n{svc.log_tail()}")
        memory.sample()
        time.sleep(poll_s)
    raise SystemExit(f"no SEG and SR for study {study_uid} after {RESULT_TIMEOUT_S} s:\n"
                     f"{svc.log_tail()}")


def stage_table(jobs_db: Path, studies: list[str]) -> dict[str, list[float]]:
    """Per stage, the seconds each study's job spent in it (from the job store)."""
    stages: dict[str, list[float]] = {}
    with JobStore(jobs_db) as jobs, Outbox(jobs_db.parent / "outbox.sqlite") as outbox:
        for job in jobs.jobs():
            if job.study_uid in studies and job.state == "done":
                for stage, seconds in job.timings.items():
                    stages.setdefault(stage, []).append(seconds)
                for item in outbox.for_job(str(job.id)):
                    if item.state == "accepted":
                        stages.setdefault("export (outbox to accepted)", []).append(
                            item.updated_at - item.created_at)
    return stages


def _stats(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f} s   max {max(values):7.2f} s"


def run(args: argparse.Namespace, tmp: Path) -> None:
    manifest = generate_cohort(CohortOptions(out=tmp / "cohort", patients=args.patients,
                                             seed=args.seed, size="default", workers=2))
    root, patients = tmp / "cohort", manifest["patients"]
    with Orthanc(tmp / "orthanc") as pacs:
        pacs.start()
        for p in patients:
            if p.get("wsi"):
                cstore_files(sorted((root / p["wsi"]["folder"]).glob("*.dcm")), pacs.host,
                             pacs.dicom_port, pacs.aet)
        config = serve_config(tmp, pacs, quiet_s=args.quiet_s)
        config["poll_interval_s"] = args.service_poll_s
        svc = Service(tmp, config).start()
        try:
            memory = MemoryWatch(svc.proc.pid if svc.proc else 0)
            hl7 = [root / h for p in patients for h in p["hl7"]]
            mllp_send_files(hl7, "127.0.0.1", svc.hl7_port)
            rows = []
            for p in patients:
                uid = p["ct"]["study_uid"]
                sent = send_study(svc.dicom_port, root, p)
                stored = wait_results(pacs, svc, uid, args.poll_s, memory)
                rows.append((p["group"], uid, stored - sent))
            memory.sample()
        finally:
            svc.stop()
    report(args, rows, stage_table(tmp / "state" / "jobs.sqlite", [r[1] for r in rows]),
           memory)


def report(args: argparse.Namespace, rows: list[tuple[str, str, float]],
           stages: dict[str, list[float]], memory: MemoryWatch) -> None:
    load = os.getloadavg()
    print(f"turnaround: {len(rows)} default-size studies sent one at a time, quiet period "
          f"{args.quiet_s} s, {os.cpu_count()} cores, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}")
    for group, uid, seconds in rows:
        print(f"  {group:4s} study {uid}: {seconds:7.2f} s "
              f"({seconds - args.quiet_s:7.2f} s without the quiet period)")
    total = [r[2] for r in rows]
    print(f"  turnaround, quiet period included   {_stats(total)}   (target median <= 60 s)")
    print(f"  turnaround, quiet period excluded   "
          f"{_stats([t - args.quiet_s for t in total])}")
    print("  stages (job store timings):")
    for stage, values in stages.items():
        print(f"    {stage:24s} {_stats(values)}")
    peak = memory.peak_kib.get(memory.pid, 0)
    print(f"  peak resident memory (VmHWM) of the service: {peak / 1024 ** 2:.2f} GiB "
          f"(target <= 4 GiB)")
    for pid, kib in memory.peak_kib.items():
        if pid != memory.pid:
            print(f"    child {pid} {memory.names.get(pid, '?')}: {kib / 1024 ** 2:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=3, help="studies to send (CRC and PDAC)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--quiet-s", type=float, default=5.0,
                    help="the service's quiet period before a study is complete")
    ap.add_argument("--poll-s", type=float, default=0.1, help="Orthanc polling interval")
    ap.add_argument("--service-poll-s", type=float, default=0.2,
                    help="the service's own polling interval (poll_interval_s)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oncopacs-turnaround-"))
    try:
        run(args, tmp)
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
