"""WSI tiles per second through model A's tile encoder, next to raw wsidicom
read-and-decode of the same tiles, in the same run.

    python bench/tile_encoder_bench.py [--package models/crc-liver-metastasis]
                                       [--threads 2] [--max-tiles 2000] [--repeats 3]

Generates one default-size synthetic H&E slide in a temporary folder and reads its
tissue tiles with the package's tile specification (mpp, tile size) through
``ml.wsi_tiles.read_tissue_tiles`` (wsidicom read and JPEG decode, the same code the
service uses), keeping the tiles in memory; then times

a. reading and decoding those tiles again (wsidicom, files on local disk);
b. encoding the same tiles with the tile encoder (batches of the spec's batch size),
   on CPU and, when torch sees one, on the GPU;
c. a and b together as the service does them (read a batch, encode it).

Prints tiles/s (best of ``--repeats``) for each, and the ratio b/a.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ml.crc.network import tiles_to_tensor
from ml.crc.predict import CrcPredictor
from ml.synth.cohort import generate_patient
from ml.wsi_tiles import read_tissue_tiles

ROOT = Path(__file__).resolve().parents[1]


def best(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """Best wall time of ``repeats`` runs (after a warm-up) and the tiles per run."""
    count = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--package", type=Path, default=ROOT / "models" / "crc-liver-metastasis")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tiles", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = CrcPredictor.from_package(args.package, device="cpu")
    spec = dataclasses.replace(model.tile_spec, max_tiles=args.max_tiles)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entry = generate_patient(seed=99, index=0, centre_count=3, size_name="default",
                                 root=root)
        folder = root / entry["wsi"]["folder"]
        tiles = np.concatenate([b.pixels for b in read_tissue_tiles(folder, spec)])

        def read() -> int:
            return sum(len(b.pixels) for b in read_tissue_tiles(folder, spec))

        def encoder(device: torch.device) -> Callable[[], int]:
            net = model.net.to(device)

            def run() -> int:
                with torch.no_grad():
                    for start in range(0, len(tiles), spec.batch_size):
                        batch = torch.from_numpy(tiles[start:start + spec.batch_size])
                        net.encode_tiles(tiles_to_tensor(batch).to(device))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                return len(tiles)
            return run

        def read_and_encode() -> int:
            with torch.no_grad():
                return model.encode_tiles(read_tissue_tiles(folder, spec)).count

        print(f"slide {entry['wsi']['base_px']} px at {entry['wsi']['base_mpp']} um/px; "
              f"{len(tiles)} tissue tiles of {spec.tile_px} px at {spec.target_mpp} um/px; "
              f"package {model.name} {model.version}; torch threads {torch.get_num_threads()}")
        t_read, n = best(args.repeats, read)
        print(f"  a. wsidicom read + decode       {n / t_read:9.0f} tiles/s")
        devices = [torch.device("cpu")] + ([torch.device("cuda")]
                                           if torch.cuda.is_available() else [])
        for device in devices:
            t_enc, n = best(args.repeats, encoder(device))
            name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            print(f"  b. tile encoder ({name})  {n / t_enc:9.0f} tiles/s   "
                  f"ratio b/a {t_read / t_enc:5.2f}")
        model.net.to("cpu")
        t_both, n = best(args.repeats, read_and_encode)
        print(f"  c. read + encode (cpu, as served) {n / t_both:9.0f} tiles/s")


if __name__ == "__main__":
    main()
