"""``oncopacs train seg``: train the segmentation model and write its package.

``add_parser(subs)`` registers ``seg`` on the ``train`` command's sub-parsers;
the parsed namespace's ``run`` returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ml.seg.data import cohort_root, split_by_centre
from ml.seg.package import load_package
from ml.seg.train import EVALUATION_FILE, TrainSettings, evaluate, train

log = logging.getLogger(__name__)


def add_parser(subs: Any) -> None:
    """Register ``seg`` (``oncopacs train seg``) on ``subs``."""
    p = subs.add_parser("seg", help="train the liver/pancreas/tumour segmentation model",
                        description=__doc__)
    p.add_argument("--manifest", type=Path, required=True,
                   help="cohort manifest.json (or its folder) from `oncopacs synth`")
    p.add_argument("--out", type=Path, required=True,
                   help="package folder to write (MONAI bundle layout), e.g. models/NAME")
    p.add_argument("--epochs", type=int, default=TrainSettings().epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", metavar="CENTRE",
                   help="held-out centre for the Dice figures (default: the cohort's last)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where to train (cpu is deterministic)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--evaluate-only", action="store_true",
                   help="do not train: evaluate the package in --out on the held-out centre")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train (or only evaluate) and print the held-out Dice per structure as JSON.

    Raises
    ------
    ml.errors.OncopacsError
        If the cohort, the settings or the package are not usable.
    """
    if args.evaluate_only:
        load_package(args.out)
        _, test, held = split_by_centre(args.manifest, args.holdout)
        result = evaluate(args.out, test, cohort_root(args.manifest))
        result["held_out_centre"] = held
        summary = {"held_out_centre": held, "dice_mean": result["dice_mean"],
                   "patients": result["patients"]}
    else:
        settings = TrainSettings(epochs=args.epochs, seed=args.seed, holdout=args.holdout,
                                 device=args.device, threads=args.threads)
        done = train(args.manifest, args.out, settings)
        summary = {"held_out_centre": done.evaluation["held_out_centre"],
                   "dice_mean": done.evaluation["dice_mean"],
                   "patients": done.evaluation["patients"], "sha256": done.sha256,
                   "seconds": round(done.seconds, 1), "evaluation": str(args.out /
                                                                       EVALUATION_FILE)}
    print(json.dumps(summary, indent=1))
    return 0
