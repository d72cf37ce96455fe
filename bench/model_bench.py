"""Inference time per study of models A and B, on CPU and on a GPU when torch sees one.

    python bench/model_bench.py [--crc models/crc-liver-metastasis] [--tsr models/pdac-tsr]
                                [--size default] [--threads 2] [--repeats 3]

Generates one synthetic CRC and one PDAC patient (``--size``, default ``default``) in
a temporary folder and times, per device (best and median of ``--repeats`` after a
warm-up), what the model steps of the service do for one study:

- A: crops from the portal-venous CT and its labels, the slide's tissue tiles read
  with wsidicom and encoded batch by batch, the clinical fields, fusion and heads;
- B: crops from the arterial and venous CT, adapters, phase attention and the
  prompt logits.

The ground-truth labels stand in for the segmentation (timed by bench/seg_bench.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ml.crc.clinical import CrcClinical
from ml.crc.predict import CrcPredictor
from ml.seg.data import load_labels, load_series
from ml.synth.cohort import generate_patient
from ml.tsr.predict import TsrPredictor
from ml.wsi_tiles import read_tissue_tiles

ROOT = Path(__file__).resolve().parents[1]


def timed(repeats: int, device: torch.device, run: Callable[[], object]) -> list[float]:
    """Wall times of ``repeats`` runs after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def phase(root: Path, entry: dict[str, object], name: str
          ) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """HU volume, spacing and ground-truth class labels of one CT phase."""
    ct = entry["ct"]
    assert isinstance(ct, dict)
    folder = next(root / s["folder"] for s in ct["series"] if s["phase"] == name)
    volume = load_series(folder)
    return volume.hu, volume.spacing_mm, load_labels(root / ct["labels"], volume)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--crc", type=Path, default=ROOT / "models" / "crc-liver-metastasis")
    ap.add_argument("--tsr", type=Path, default=ROOT / "models" / "pdac-tsr")
    ap.add_argument("--size", choices=["tiny", "default"], default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        crc = generate_patient(seed=99, index=0, centre_count=3, size_name=args.size, root=root)
        pdac = generate_patient(seed=99, index=1, centre_count=3, size_name=args.size,
                                root=root)
        venous_a = phase(root, crc, "venous")
        arterial_b, venous_b = phase(root, pdac, "arterial"), phase(root, pdac, "venous")
        wsi = crc["wsi"]
        assert isinstance(wsi, dict)
        slide = root / wsi["folder"]
        labels = crc["labels"]
        assert isinstance(labels, dict)
        clinical = CrcClinical.from_labels(labels, int(str(crc["age_years"])),
                                           str(crc["sex"]))
        print(f"{args.size}-size studies: CT {venous_a[0].shape} voxels; slide "
              f"{wsi['base_px']} px; torch threads {torch.get_num_threads()}")
        for device in devices:
            model_a = CrcPredictor.from_package(args.crc, device=device.type)
            model_b = TsrPredictor.from_package(args.tsr, device=device.type)
            def run_a(m: CrcPredictor = model_a) -> object:
                return m.predict(*venous_a, tile_batches=read_tissue_tiles(slide, m.tile_spec),
                                 clinical=clinical)

            def run_b(m: TsrPredictor = model_b) -> object:
                return m.predict(arterial=arterial_b, venous=venous_b)

            name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            for label, run in (("A (CT + slide + clinical)", run_a), ("B (two phases)", run_b)):
                times = timed(args.repeats, device, run)
                print(f"  {name}: model {label}: best {min(times):.3f} s, median "
                      f"{statistics.median(times):.3f} s per study over {args.repeats}")


if __name__ == "__main__":
    main()
