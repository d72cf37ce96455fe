"""``oncopacs serve`` and ``oncopacs status``."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from app.config import load_config


def add_parsers(subs: Any) -> None:
    """Register ``serve`` and ``status`` on the top-level sub-parsers."""
    p = subs.add_parser("serve", help="run the service beside the PACS until stopped")
    p.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    p.set_defaults(run=run_serve)
    s = subs.add_parser("status", help="list jobs, their states and reasons")
    s.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    s.add_argument("--state", help="only jobs in this state")
    s.set_defaults(run=run_status)


def run_serve(args: argparse.Namespace) -> int:
    """Load the configuration and serve until SIGTERM/SIGINT."""
    from app.serve import serve  # imports Holoscan; only this command needs it

    serve(load_config(args.config))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Print one line per job (id, state, pipeline, updated, reason) and the counts."""
    from app.export import Outbox
    from app.jobs import JobStore

    settings = load_config(args.config)
    with JobStore(settings.storage.jobs_db) as jobs:
        for job in jobs.jobs(args.state):
            when = dt.datetime.fromtimestamp(job.updated_at).isoformat(timespec="seconds")
            print(f"job {job.id:5d}  {job.state:9}  {job.pipeline or '-':7}  {when}  "
                  f"study {job.study_uid}  {job.reason or ''}")
        counts = jobs.counts_by_state()
    with Outbox(settings.storage.outbox_db, settings.export) as outbox:
        exports = outbox.counts()
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    print("exports: " + ", ".join(f"{k} {v}" for k, v in exports.items()))
    return 0
