"""``oncopacs train B``: train the PDAC tumour-stroma ratio model and write its package.

``add_parser(subs)`` registers ``B`` on the ``train`` command's sub-parsers; the
parsed namespace's ``run`` returns the process exit code and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ml.errors import ConfigError
from ml.tsr.head import HeadSettings
from ml.tsr.pretrain import PretrainSettings
from ml.tsr.train import TrainSettings, default_cache, train


def add_parser(subs: Any) -> None:
    """Register ``B`` (``oncopacs train B``) on ``subs``."""
    p = subs.add_parser("B", help="train the PDAC tumour-stroma ratio model (dual-phase CT)",
                        description=__doc__)
    p.add_argument("--manifest", type=Path, required=True,
                   help="cohort manifest.json (or its folder) from `oncopacs synth`")
    p.add_argument("--out", type=Path, required=True,
                   help="package folder to write, e.g. models/pdac-tsr")
    p.add_argument("--epochs", type=int, default=HeadSettings().epochs,
                   help="epochs of the adapter/attention head training")
    p.add_argument("--pretrain-epochs", type=int, default=PretrainSettings().epochs,
                   help="epochs of the contrastive CLIP pre-training (ignored with "
                        "--clip-checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 is fastest on a shared CPU; the head "
                        "training always uses one)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where to train (cpu is deterministic)")
    p.add_argument("--test-centre", default="C3", help="held-out centre (never trained on)")
    p.add_argument("--clip-checkpoint", type=Path,
                   help="a site's CLIP state_dict for the same architecture: skips pre-training")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"crop cache folder (default {default_cache()})")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The training settings the command line asks for.

    Raises
    ------
    ConfigError
        If a value is out of range (e.g. a negative epoch count).
    """
    base = TrainSettings().model_dump()
    if args.clip_checkpoint is not None:
        base["model"]["clip_checkpoint"] = str(args.clip_checkpoint)
    base["pretrain"]["epochs"] = args.pretrain_epochs
    base["head"]["epochs"] = args.epochs
    base.update(seed=args.seed, test_centre=args.test_centre, threads=args.threads,
                device=args.device, cache=args.cache)
    try:
        return TrainSettings.model_validate(base)
    except ValidationError as exc:
        raise ConfigError(f"oncopacs train B: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Train, write the package and print a JSON summary.

    Raises
    ------
    ml.errors.OncopacsError
        If the cohort, the settings or a checkpoint are not usable.
    """
    done = train(args.manifest, args.out, settings_from_args(args))
    summary = {"package": str(done.out), "sha256": done.sha256,
               "seconds": round(done.seconds, 1), "threshold": round(done.threshold, 4),
               "auc_internal_validation": done.metrics["auc_internal_validation"],
               "held_out_centre": done.metrics["held_out_centre"],
               "held_out_patients": done.metrics["held_out_patients"],
               "auc_held_out": done.metrics["auc_held_out"]}
    print(json.dumps(summary, indent=1))
    return 0
