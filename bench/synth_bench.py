"""Benchmark: synthetic cohort generation speed and size on disk.

    python bench/synth_bench.py [--patients 20] [--size default] [--workers N]

Prints patients per minute, the cohort's size on disk and the time a
100-patient cohort of that size would take at the measured rate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ml.synth.cohort import CohortOptions, generate_cohort


def disk_bytes(root: Path) -> int:
    """Bytes of all files below ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--size", default="default", choices=["tiny", "default"])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--keep", type=Path, help="write the cohort here and keep it")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oncopacs-bench-"))
    out = args.keep or tmp / "cohort"
    try:
        start = time.perf_counter()
        manifest = generate_cohort(CohortOptions(out=out, patients=args.patients,
                                                 seed=args.seed, size=args.size,
                                                 workers=args.workers))
        seconds = time.perf_counter() - start
        size_b = disk_bytes(out)
        files = sum(1 for p in out.rglob("*") if p.is_file())
        n = len(manifest["patients"])
        rate = n / seconds * 60.0
        print(f"synth size={args.size} patients={n} workers={args.workers} cores={os.cpu_count()}")
        print(f"  wall time           {seconds:8.1f} s")
        print(f"  patients per minute {rate:8.1f}")
        print(f"  size on disk        {size_b / 2**20:8.1f} MiB ({files} files, "
              f"{size_b / n / 2**20:.1f} MiB per patient)")
        print(f"  100 patients would take about {100 / rate:.1f} min and "
              f"{size_b / n * 100 / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
