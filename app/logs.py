"""Logging set-up, done once by the entry point (libraries only get loggers)."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(verbosity: int = 0) -> None:
    """Send log records to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
