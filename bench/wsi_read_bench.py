"""Benchmark: tissue tiles per second, from an Orthanc over DICOMweb, by C-GET, and from files.

    python bench/wsi_read_bench.py [--target-mpp 2.0 1.0] [--tile-px 224] [--repeats 3]

Writes one default-size synthetic CRC slide (6144 px at 1 mpp, 4 levels, 256 px JPEG
frames), stores it in a fresh Orthanc (``app.orthanc.Orthanc``, DICOMweb plugin), then
for each target mpp times ``open_slide`` + ``tissue_tiles`` over every tissue tile:

- ``files``:    ``WsiDicom.open`` on the generated files (no network);
- ``dicomweb``: ``open_slide`` with the DICOMweb URL (only the frames read are fetched);
- ``c-get``:    ``open_slide`` without DICOMweb (the whole series is retrieved first).

Prints the median over ``--repeats`` runs of the time to the first batch, the total
time, tiles per second, and for DICOMweb the HTTP requests and bytes received against
the size of the whole slide.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from wsidicom import WsiDicom

from app.orthanc import Orthanc
from app.wsi_fetch import SlideRef, WsiArchiveSettings, open_slide, tissue_tiles
from ml.synth.centres import centres
from ml.synth.latent import sample_patient
from ml.synth.push import cstore_files
from ml.synth.sizes import size
from ml.synth.wsi import write_wsi

SEED = 2027


@dataclass
class Run:
    first_batch_s: float
    total_s: float
    tiles: int
    requests: int = 0
    received_bytes: int = 0


class Traffic:
    """A requests response hook: requests made and bytes received."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.requests += 1
        self.bytes += len(response.content)


def timed(open_: Callable[[], WsiDicom], settings: WsiArchiveSettings) -> Run:
    start = time.perf_counter()
    first = 0.0
    tiles = 0
    with open_() as slide:
        for batch in tissue_tiles(slide, settings):
            tiles += len(batch.pixels)
            if not first:
                first = time.perf_counter() - start
    return Run(first, time.perf_counter() - start, tiles)


def measure(mode: str, settings: WsiArchiveSettings, ref: SlideRef, files: list[Path],
            work: Path) -> Run:
    if mode == "files":
        return timed(lambda: WsiDicom.open(files), settings)
    if mode == "c-get":
        folder = Path(tempfile.mkdtemp(dir=work))
        run = timed(lambda: open_slide(settings.model_copy(update={"dicomweb_url": None}),
                                       ref, folder), settings)
        shutil.rmtree(folder)
        return run
    traffic = Traffic()
    with requests.Session() as session:
        session.hooks["response"].append(traffic)
        run = timed(lambda: open_slide(settings, ref, work / "unused", session=session),
                    settings)
    run.requests, run.received_bytes = traffic.requests, traffic.bytes
    return run


def report(mode: str, runs: list[Run], slide_bytes: int) -> None:
    total = statistics.median(r.total_s for r in runs)
    first = statistics.median(r.first_batch_s for r in runs)
    tiles = runs[0].tiles
    line = (f"  {mode:9s} {tiles:5d} tiles  first batch {first * 1000:7.0f} ms  "
            f"total {total:6.2f} s  {tiles / total:8.1f} tiles/s")
    if mode == "dicomweb":
        line += (f"  {runs[0].requests} requests, {runs[0].received_bytes / 2**20:.1f} MiB "
                 f"of {slide_bytes / 2**20:.1f} MiB")
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-mpp", type=float, nargs="+", default=[2.0, 1.0])
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oncopacs-wsi-bench-"))
    try:
        spec = sample_patient(SEED, 0, centres(3))
        start = time.perf_counter()
        record = write_wsi(spec, size("default"), SEED, work / "patient")
        files = sorted(record.folder.glob("*.dcm"))
        slide_bytes = sum(p.stat().st_size for p in files)
        print(f"slide: {record.base_px[0]} px at {record.base_mpp} mpp, {record.levels} "
              f"levels, {slide_bytes / 2**20:.1f} MiB, written in "
              f"{time.perf_counter() - start:.1f} s")
        with Orthanc(work / "orthanc") as server:
            pushed = cstore_files(files, server.host, server.dicom_port, server.aet)
            assert pushed.sent == len(files), pushed.failed
            ref = SlideRef(record.study_uid, record.series_uid, None, "", "", None)
            for target in args.target_mpp:
                settings = WsiArchiveSettings(
                    host=server.host, port=server.dicom_port, called_aet=server.aet,
                    dicomweb_url=server.dicomweb_url, target_mpp=target,
                    tile_px=args.tile_px, batch_size=args.batch_size, max_tiles=None)
                print(f"target {target} mpp, {args.tile_px} px tiles, batches of "
                      f"{args.batch_size}, median of {args.repeats}:")
                for mode in ("files", "dicomweb", "c-get"):
                    runs = [measure(mode, settings, ref, files, work)
                            for _ in range(args.repeats)]
                    report(mode, runs, slide_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
