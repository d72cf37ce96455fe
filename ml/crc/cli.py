"""``oncopacs train A``: train model A (CRC liver-metastasis risk) and write its package.

``add_parser(subs)`` registers ``A`` on the ``train`` command's sub-parsers; the
parsed namespace's ``run`` returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ml.crc.train import TrainSettings, default_cache_dir, train


def add_parser(subs: Any) -> None:
    """Register ``A`` (``oncopacs train A``) on ``subs``."""
    defaults = TrainSettings()
    p = subs.add_parser("A", help="train model A: CRC liver-metastasis risk (CT + WSI + clinical)",
                        description=__doc__)
    p.add_argument("--manifest", type=Path, required=True,
                   help="cohort manifest.json (or its folder) from `oncopacs synth`")
    p.add_argument("--out", type=Path, required=True,
                   help="package folder to write, e.g. models/crc-liver-metastasis")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="CPU threads for torch")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=defaults.device,
                   help="where to train (cpu is deterministic)")
    p.add_argument("--test-centre", default=defaults.test_centre, metavar="CENTRE",
                   help="held-out centre, never read in training (default %(default)s)")
    p.add_argument("--cache", type=Path, default=default_cache_dir(),
                   help="folder for preprocessed examples (default %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train, write the package and print a JSON summary.

    Raises
    ------
    ml.errors.OncopacsError
        If the cohort or the settings are not usable.
    """
    settings = TrainSettings(epochs=args.epochs, seed=args.seed, threads=args.threads,
                             device=args.device, test_centre=args.test_centre,
                             cache_dir=args.cache)
    done = train(args.manifest, args.out, settings)
    summary = {"package": str(done.package), "seconds": round(done.seconds, 1),
               "epochs_run": done.epochs_run, "best_epoch": done.best_epoch,
               "threshold": round(done.threshold, 4), "validation": done.val_metrics,
               "split": done.split}
    print(json.dumps(summary, indent=1))
    return 0
