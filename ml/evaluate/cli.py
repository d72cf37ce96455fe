"""``oncopacs evaluate``: score a model package on held-out data and write its report.

The package's ``configs/metadata.json`` names its task; the task's scorer
(``ml.crc.evaluate.score_crc`` or ``ml.tsr.evaluate.score_tsr``) turns the package
and the cohort manifest into a :class:`~ml.evaluate.scored.Scored` test set, and
:func:`~ml.evaluate.run.evaluate_scored` writes ``metrics.json``, the figures and
``report.md`` into ``--out``. A short JSON summary is printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml.errors import ConfigError
from ml.evaluate.run import evaluate_scored
from ml.evaluate.scored import Scored
from ml.package import METADATA, PackageError, read_metadata

SCORERS: dict[str, tuple[str, str]] = {
    "crc-liver-metastasis": ("ml.crc.evaluate", "score_crc"),
    "pdac-tsr": ("ml.tsr.evaluate", "score_tsr"),
}
"""Task name to (module, function) of the scorer returning a :class:`Scored`."""

MANIFEST_NAME = "manifest.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` options to ``p`` and set its ``run`` default."""
    p.add_argument("--model", type=Path, required=True,
                   help="model package folder (with configs/metadata.json)")
    p.add_argument("--manifest", type=Path, required=True,
                   help="cohort manifest.json (or its folder) from `oncopacs synth`")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for metrics.json, report.md and the figures")
    p.add_argument("--test-centre", metavar="CENTRE",
                   help="held-out centre to evaluate on (default: the scorer's choice, "
                        "the package's held-out centre)")
    p.add_argument("--segmentation", type=Path, metavar="PKG",
                   help="place the model's crops with this segmentation package run on the "
                        "portal-venous series, as the service does (default: the cohort's "
                        "ground-truth labels, which validates the model alone)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="bootstrap resamples for AUC CIs (default 0: DeLong CIs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and ROC bands")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where the model runs")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.set_defaults(run=run)


def add_parser(subs_or_parser: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on a sub-parsers action, or configure a parser directly.

    Parameters
    ----------
    subs_or_parser : argparse._SubParsersAction or argparse.ArgumentParser
        The top-level ``add_subparsers()`` result (an ``evaluate`` sub-command is
        added), or a parser that becomes the ``evaluate`` command itself.

    Returns
    -------
    argparse.ArgumentParser
        The parser holding the ``evaluate`` options.
    """
    if isinstance(subs_or_parser, argparse.ArgumentParser):
        parser = subs_or_parser
    else:
        parser = subs_or_parser.add_parser(
            "evaluate", help="evaluate a model package on held-out data (TRIPOD+AI report)",
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` command to the top-level ``oncopacs`` sub-parsers."""
    return add_parser(subparsers)


def package_task(package: Path) -> str:
    """Return the task named in a package's metadata.

    Raises
    ------
    ConfigError
        If the package folder or its metadata is missing or unreadable, or the task
        has no scorer.
    """
    if not package.is_dir():
        raise ConfigError(f"model package folder {package} does not exist")
    try:
        metadata = read_metadata(package)
    except PackageError as exc:
        raise ConfigError(f"model package {package}: {exc}") from exc
    task = metadata.get("task")
    if task not in SCORERS:
        raise ConfigError(f"model package {package}: unknown task {task!r} in {METADATA}; "
                          f"known tasks: {sorted(SCORERS)}")
    return str(task)


def manifest_path(path: Path) -> Path:
    """The manifest file given a file or its folder.

    Raises
    ------
    ConfigError
        If no manifest file exists there.
    """
    candidate = path / MANIFEST_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"cohort manifest {candidate} does not exist")
    return candidate


def scorer(task: str) -> Callable[..., Any]:
    """Import and return the scorer of ``task`` (imported only when needed).

    Raises
    ------
    ConfigError
        If the task is unknown or its scorer cannot be imported.
    """
    if task not in SCORERS:
        raise ConfigError(f"unknown task {task!r}; known tasks: {sorted(SCORERS)}")
    module_name, func_name = SCORERS[task]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"scorer {module_name}.{func_name} for task {task!r} cannot be "
                          f"imported: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"module {module_name} has no function {func_name} for task {task!r}")
    return func  # type: ignore[no-any-return]


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The short summary printed by the command."""
    model = result["auc"]["model"]
    return {"model": result["model"], "task": result["task"], "n": result["n"],
            "events": result["events"],
            "auc": {"auc": model["auc"], "low": model["low"], "high": model["high"],
                    "method": model["method"]},
            "delong_p": {name: d["p_value"] for name, d in result["delong"].items()},
            "ratio_to_reference": result["ratio_to_reference"],
            "files": result["files"]}


def run(args: argparse.Namespace) -> int:
    """Score the package, evaluate it, and print the summary as JSON.

    Raises
    ------
    ml.errors.OncopacsError
        If the package, the manifest or the options are not usable.
    """
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ConfigError(f"--bootstrap must be 0 (DeLong CIs) or at least 2, got {args.bootstrap}")
    task = package_task(args.model)
    manifest = manifest_path(args.manifest)
    if args.segmentation is not None and not args.segmentation.is_dir():
        raise ConfigError(f"segmentation package folder {args.segmentation} does not exist")
    scored = scorer(task)(args.model, manifest, test_centre=args.test_centre,
                          device=args.device, threads=args.threads,
                          segmentation=args.segmentation)
    if not isinstance(scored, Scored):
        raise ConfigError(f"the scorer of task {task!r} returned {type(scored).__name__}, "
                          "not a Scored")
    result = evaluate_scored(scored, args.out, bootstrap=args.bootstrap, seed=args.seed)
    print(json.dumps(summary(result), indent=1))
    return 0
