"""The ``oncopacs`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app import demo_cmd, logs, oneshot_cmd, serve_cmd, synth_cmd
from ml.crc import cli as crc_cli
from ml.errors import OncopacsError
from ml.evaluate import cli as evaluate_cli
from ml.seg import cli as seg_cli
from ml.tsr import cli as tsr_cli

log = logging.getLogger("oncopacs")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    top = argparse.ArgumentParser(prog="oncopacs", description=__doc__)
    top.add_argument("-v", "--verbose", action="count", default=0,
                     help="more log output (-v info, -vv debug)")
    subs = top.add_subparsers(dest="command", required=True)
    synth_cmd.add_parser(subs)
    demo_cmd.add_parser(subs)
    serve_cmd.add_parsers(subs)
    oneshot_cmd.add_parser(subs)
    train = subs.add_parser("train", help="train a model and write its package")
    models = train.add_subparsers(dest="model", required=True)
    seg_cli.add_parser(models)
    crc_cli.add_parser(models)
    tsr_cli.add_parser(models)
    evaluate_cli.register(subs)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the process exit code (0 ok, 2 bad input)."""
    args = parser().parse_args(argv)
    logs.configure(args.verbose)
    try:
        code: int = args.run(args)
    except OncopacsError as exc:
        print(f"oncopacs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code
