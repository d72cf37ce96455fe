"""Benchmark: DICOM ingest speed of the oncopacs listener against dcmtk's storescp.

    python bench/ingest_bench.py [--seed 2026] [--repeats 3] [--max-pdu 131072]

Generates one default-size synthetic patient and sends its CT study (both series) with
dcmtk ``storescu`` over one association, in the same run, to

a. dcmtk ``storescp`` writing files to a temporary folder (no fsync);
b. :class:`app.dicom_listener.DicomListener` with its durable spool (fsync of file and
   folder) and SQLite job store (WAL, synchronous=FULL): success only after both;
c. the same listener with the spool's fsync disabled (this benchmark only), to show how
   much of (b) is the durability and how much is pynetdicom.

storescu waits for each C-STORE response before it sends the next instance, so (b)
pays one file fsync, one folder fsync and one SQLite commit per instance on the
critical path; storescp (dcmtk 3.6.7) has no fsync option at all.

Prints instances/s and MB/s of the best of ``--repeats`` runs per receiver, and the ratio
(b)/(a). Both peers run with ``TCP_NODELAY=1``: dcmtk 3.6.7 otherwise leaves Nagle's
algorithm on and every PDU waits for a delayed ACK (~40 ms), which hides the receivers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from app.dicom_listener import DicomListener, ListenerSettings, PeerSettings
from app.jobs import JobStore
from app.ports import free_port
from app.spool import Spool
from ml.synth.cohort import CohortOptions, generate_cohort

SCU_AET, SCP_AET = "BENCHSCU", "BENCHSCP"
DEADLINE_S = 30.0
ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(name: str) -> str:
    """dcmtk's program (pynetdicom's console scripts of the same name shadow it on PATH)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    raise SystemExit(f"dcmtk {name} not found; install the Debian package dcmtk")


def wait_listening(port: int) -> None:
    """Poll until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {DEADLINE_S} s")


def send(port: int, folders: list[Path]) -> float:
    """Send every ``*.dcm`` below ``folders`` with storescu; returns wall seconds."""
    args = [dcmtk("storescu"), "-R", "-aet", SCU_AET, "-aec", SCP_AET, "+sd", "+r",
            "+sp", "*.dcm", "127.0.0.1", str(port), *map(str, folders)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False, env=ENV)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}):\n{proc.stderr}")
    return seconds


@contextmanager
def storescp(out: Path, max_pdu: int) -> Iterator[int]:
    port = free_port()
    out.mkdir(parents=True)
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", SCP_AET, "-pdu", str(max_pdu),
                             "-od", str(out), str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)


@contextmanager
def listener(work: Path, max_pdu: int) -> Iterator[int]:
    settings = ListenerSettings(ae_title=SCP_AET, port=free_port(), max_pdu=max_pdu,
                                allowed_peers=(PeerSettings(ae_title=SCU_AET),))
    jobs = JobStore(work / "jobs.db")
    with DicomListener(settings, Spool(work / "spool"), jobs) as running:
        yield running.port
    jobs.close()


def best_of(repeats: int, run: Callable[[Path], float], tmp: Path) -> float:
    """Fastest of ``repeats`` runs, each into a fresh folder."""
    times = []
    for i in range(repeats):
        work = tmp / f"run-{time.monotonic_ns()}-{i}"
        work.mkdir()
        times.append(run(work))
        shutil.rmtree(work)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-pdu", type=int, default=131072,
                    help="max receive PDU of both receivers (storescp allows up to 131072)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oncopacs-ingest-"))
    try:
        manifest = generate_cohort(CohortOptions(out=tmp / "cohort", patients=1,
                                                 seed=args.seed, size="default"))
        patient = manifest["patients"][0]
        folders = [tmp / "cohort" / s["folder"] for s in patient["ct"]["series"]]
        files = [p for f in folders for p in f.glob("*.dcm")]
        mb = sum(p.stat().st_size for p in files) / 1e6

        def to_storescp(work: Path) -> float:
            with storescp(work / "out", args.max_pdu) as port:
                return send(port, folders)

        def to_listener(work: Path) -> float:
            with listener(work, args.max_pdu) as port:
                return send(port, folders)

        def to_listener_no_fsync(work: Path) -> float:
            with mock.patch("app.spool.os.fsync"):
                return to_listener(work)

        results = {
            "a. dcmtk storescp (no fsync)": best_of(args.repeats, to_storescp, tmp),
            "b. oncopacs listener (fsync)": best_of(args.repeats, to_listener, tmp),
            "c. oncopacs listener (spool fsync off)": best_of(args.repeats,
                                                              to_listener_no_fsync, tmp),
        }
        load = os.getloadavg()
        print(f"ingest: 1 default-size CT study, {len(files)} instances, {mb:.1f} MB, "
              f"one association, max PDU {args.max_pdu}, best of {args.repeats}, "
              f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}")
        for name, seconds in results.items():
            print(f"  {name:40s} {seconds:7.3f} s {len(files) / seconds:8.1f} instances/s "
                  f"{mb / seconds:7.1f} MB/s")
        a, b = results["a. dcmtk storescp (no fsync)"], results["b. oncopacs listener (fsync)"]
        print(f"  ratio listener/storescp (b/a)            {a / b:7.2f} (target >= 0.8)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
