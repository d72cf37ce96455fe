"""Time segmentation of one default-size study with the shipped package (CPU, and GPU if any).

    python bench/seg_bench.py [--package models/seg-synthetic] [--threads 2] [--repeats 3]

Generates one default-size synthetic patient in a temporary folder, loads its
venous series, and prints the wall time of ``ml.seg.infer.segment`` (best and
median of the repeats, after one warm-up) per device, with the liver Dice.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ml.seg.data import load_case
from ml.seg.infer import dice, segment
from ml.seg.package import load_package
from ml.synth.cohort import generate_patient

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--package", type=Path, default=ROOT / "models" / "seg-synthetic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    package = load_package(args.package)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entry = generate_patient(seed=99, index=1, centre_count=3, size_name="default",
                                 root=root)
        case = load_case(entry, root)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"study {case.ct.hu.shape} voxels at {case.ct.spacing_mm} mm; package "
          f"{package.name} {package.version}; working spacing "
          f"{package.preprocessing.spacing_mm} mm; torch threads {torch.get_num_threads()}")
    for device in devices:
        pred = segment(case.ct.hu, case.ct.spacing_mm, package, device)  # warm-up
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pred = segment(case.ct.hu, case.ct.spacing_mm, package, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"{name}: segment best {min(times):.2f} s, median "
              f"{statistics.median(times):.2f} s over {args.repeats}; liver Dice "
              f"{dice(pred, case.labels)['liver']:.3f}")


if __name__ == "__main__":
    main()
