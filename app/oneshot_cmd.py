"""``oncopacs run`` and ``python -m app -i IN -o OUT [-m MODELS]``: the one-shot mode.

Both take the MONAI Deploy App SDK's options (``-i``, ``-o``, ``-m``, ``-w``,
``-l``), each falling back to its ``HOLOSCAN_*`` variable, and ``--config`` (or
``HOLOSCAN_CONFIG_PATH``). Exit codes: 0 every study done or unmatched, 1 a study
failed, 2 bad paths, configuration or model package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app import logs
from ml.errors import OncopacsError

ONESHOT_FLAGS = ("-i", "--input", "-o", "--output", "-m", "--model")
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")


def is_oneshot_argv(argv: Sequence[str]) -> bool:
    """Whether ``python -m app`` was started the MAP way: with ``-i``/``-o``/``-m`` (the
    CLI's sub-commands take none of them), or with no arguments inside a MAP (where
    ``HOLOSCAN_INPUT_PATH`` is set)."""
    if not argv:
        return "HOLOSCAN_INPUT_PATH" in os.environ
    return any(a in ONESHOT_FLAGS or a.split("=", 1)[0] in ONESHOT_FLAGS for a in argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The one-shot options (the SDK's names), shared by ``oncopacs run`` and ``-m app``."""
    p.add_argument("-i", "--input", type=Path,
                   help="folder of DICOM (and *.hl7) files (default: $HOLOSCAN_INPUT_PATH, "
                   "else ./input)")
    p.add_argument("-o", "--output", type=Path,
                   help="results folder (default: $HOLOSCAN_OUTPUT_PATH, else ./output)")
    p.add_argument("-m", "--model", dest="models", type=Path,
                   help="model folder: a package or models/<name>/ (default: "
                   "$HOLOSCAN_MODEL_PATH, else the configured package)")
    p.add_argument("-w", "--workdir", type=Path,
                   help="where the temporary state folder goes (default: $HOLOSCAN_WORKDIR, "
                   "else the system's temporary folder)")
    p.add_argument("-c", "--config", type=Path,
                   help="YAML configuration: routing, segmentation, wsi, results sections "
                   "(default: $HOLOSCAN_CONFIG_PATH, else none)")
    p.add_argument("-l", "--log-level", type=str.upper, choices=LOG_LEVELS,
                   help="log level (the SDK's option; -v also works)")


def add_parser(subs: Any) -> None:
    """Register ``run`` on the top-level sub-parsers."""
    p = subs.add_parser("run", help="one-shot: process a folder of studies into a results "
                        "folder (the MONAI Application Package contract)")
    add_arguments(p)
    p.set_defaults(run=run_oneshot_cmd)


def run_oneshot_cmd(args: argparse.Namespace) -> int:
    """Run the one-shot graph; 0 when every study is done or unmatched, else 1."""
    from app.oneshot import resolve_paths, run_oneshot  # imports Holoscan

    if args.log_level:
        logging.getLogger().setLevel("WARNING" if args.log_level == "WARN" else args.log_level)
    paths = resolve_paths(input=args.input, output=args.output, models=args.models,
                          workdir=args.workdir, config=args.config)
    report = run_oneshot(paths)
    for study in report["studies"]:
        print(f"job {study['job_id']:3d}  {study['state']:9}  {study['pipeline'] or '-':2}  "
              f"study {study['study_uid']}  {study['reason'] or ''}")
    print(f"report: {paths.output / 'report.json'}")
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app -i IN -o OUT [-m MODELS]``: returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-v info, -vv debug)")
    add_arguments(p)
    args = p.parse_args(argv)
    logs.configure(args.verbose)
    try:
        return run_oneshot_cmd(args)
    except OncopacsError as exc:
        print(f"oncopacs one-shot: error: {exc}", file=sys.stderr)
        return 2
