"""One-shot mode: the MONAI Application Package (MAP) contract over a folder.

    folder_source (scan IN, spool, jobs, HL7) -> router -> volume -> segmentation
        -> wsi_fetch -> seg_writer -> sr_writer -> result_card -> folder_sink (OUT/<study>/)

The same operators and :mod:`app.pipeline` steps as ``oncopacs serve`` run between
a source that reads the input folder and a sink that writes the output folder
instead of the DICOM listener and the PACS export. Paths follow monai-deploy-app-sdk
4.0.0 (:class:`monai.deploy.core.AppContext`): ``-i``/``-o``/``-m``/``-w`` override
``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH`` and
``HOLOSCAN_WORKDIR``; the configuration comes from ``--config`` or
``HOLOSCAN_CONFIG_PATH`` (in a MAP, the packaged ``app.yaml``, whose ``application``
and ``resources`` sections are the packager's and are ignored here).

The spool, job store and clinical store live in a temporary state folder (below the
work folder when one is given) that is removed when the run ends; ``OUT/report.json``
keeps every job's state and reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holoscan.conditions import BooleanCondition
from holoscan.schedulers import EventBasedScheduler
from monai.deploy.core import AppContext, Application, RuntimeEnv
from pydantic import BaseModel, ConfigDict

from app.config import (
    PATH_KEYS,
    ModelsSettings,
    PipelineSettings,
    SegmentationSettings,
    StorageSettings,
    read_config_file,
    resolve_config_paths,
    validate_settings,
)
from app.context import Services
from app.oneshot_intake import Intake, build_report, write_report
from app.results import ResultsSettings
from app.routing import RoutingSettings
from app.serve import CHAIN, open_services
from app.wsi_archive import WsiArchiveSettings
from ml.errors import OncopacsError
from ml.package import TASKS
from ml.seg.package import METADATA
from operators.base import IN, OUT
from operators.folder_sink import FolderSinkOperator
from operators.folder_source import FolderSourceOperator
from operators.pacs_export import PacsExportOperator

log = logging.getLogger(__name__)

PACKAGER_SECTIONS = frozenset({"application", "resources"})
"""Sections of a MAP's ``app.yaml`` that belong to the packager, not to oncopacs."""
STEPS = tuple(cls for cls in CHAIN if cls is not PacsExportOperator)
"""Serve's chain without its export: the folder sink takes its place."""


class OneShotError(OncopacsError):
    """The one-shot run cannot start or its source failed (names the path or study)."""


class OneShotSettings(BaseModel):
    """The configuration sections that apply to a one-shot run (no listeners, no export).

    Without ``wsi`` no slide archive is queried (pipeline A then runs without a slide).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    routing: RoutingSettings = RoutingSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    models: ModelsSettings = ModelsSettings()
    wsi: WsiArchiveSettings | None = None
    results: ResultsSettings = ResultsSettings()


def load_oneshot_config(path: Path) -> OneShotSettings:
    """Read a one-shot configuration (or a MAP ``app.yaml``) from YAML.

    Relative paths are resolved against the file's folder; the packager's
    ``application`` and ``resources`` sections are ignored.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, not a mapping, or a field is wrong (each named).
    """
    data = read_config_file(path, empty_ok=True)
    ours = {k: v for k, v in data.items() if k not in PACKAGER_SECTIONS}
    ours = resolve_config_paths(ours, path.parent.resolve(), PATH_KEYS)
    return validate_settings(OneShotSettings, ours, str(path))


@dataclass(frozen=True)
class OneShotPaths:
    """Where a run reads, writes and keeps its state; None where not given."""

    input: Path
    output: Path
    models: Path | None = None
    workdir: Path | None = None
    config: Path | None = None


def resolve_paths(*, input: Path | None = None, output: Path | None = None,
                  models: Path | None = None, workdir: Path | None = None,
                  config: Path | None = None) -> OneShotPaths:
    """Arguments over ``HOLOSCAN_*`` variables over the SDK's defaults, as AppContext does.

    Without ``models`` and ``HOLOSCAN_MODEL_PATH`` the configured segmentation package
    is used (default: the repository's ``models/seg-synthetic``), not the SDK's
    ``./models``.
    """
    given = {"input": input, "output": output, "model": models, "workdir": workdir}
    context = AppContext({k: str(v) for k, v in given.items() if v is not None})
    model_env = RuntimeEnv.ENV_DEFAULT["model"][0]
    config_path = config or (Path(p) if (p := os.environ.get("HOLOSCAN_CONFIG_PATH"))
                             else None)
    return OneShotPaths(
        input=Path(context.input_path).absolute(), output=Path(context.output_path).absolute(),
        models=Path(context.model_path).absolute()
        if models is not None or os.environ.get(model_env) else None,
        workdir=Path(context.workdir).absolute() if context.workdir else None,
        config=config_path)


def _task(folder: Path) -> str | None:
    """The task of a clinical model package (one of ``ml.package.TASKS``); ``""`` for a
    segmentation package (MONAI bundle metadata); None when ``folder`` holds no package."""
    try:
        meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    task = meta.get("task")
    return task if task in TASKS else ""


def _is_package(folder: Path) -> bool:
    return _task(folder) == ""


def find_model_package(models: Path | None, task: str, configured: Path | None,
                       ) -> Path | None:
    """The package of clinical model ``task`` (``crc-liver-metastasis``, ``pdac-tsr``):
    ``models/<configured name>`` or the only package of that task below ``models``;
    else the configured package. None when the model is configured off.

    Raises
    ------
    OneShotError
        If ``models`` holds several packages of the task and none has the configured name.
    """
    if configured is None:
        return None
    if models is None or not models.is_dir():
        return configured
    if _task(models / configured.name) == task:
        return models / configured.name
    found = sorted(p for p in models.iterdir() if p.is_dir() and _task(p) == task)
    if len(found) > 1:
        raise OneShotError(f"model folder {models} holds {len(found)} {task} packages "
                           f"({', '.join(p.name for p in found)}) and none named "
                           f"{configured.name!r}; set models.*.package in the configuration")
    return found[0] if found else configured


def find_seg_package(models: Path | None, configured: Path) -> Path:
    """The segmentation package: ``models`` itself, ``models/<configured name>``, or the
    only package below ``models`` (the MAP model folder holds ``models/<name>/``).

    Raises
    ------
    OneShotError
        If ``models`` is not a folder, or holds no package or several without one named
        like the configured package.
    """
    if models is None:
        return configured
    if not models.is_dir():
        raise OneShotError(f"model path {models} is not a folder")
    if _is_package(models):
        return models
    if _is_package(models / configured.name):
        return models / configured.name
    found = sorted(p for p in models.iterdir() if p.is_dir() and _is_package(p))
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name for p in found) or "none"
    raise OneShotError(f"model folder {models} holds {len(found)} segmentation packages "
                       f"({names}) and none named {configured.name!r}; set "
                       "segmentation.package in the configuration")


def open_oneshot_services(settings: OneShotSettings, state_root: Path,
                          package: Path, models: ModelsSettings | None = None) -> Services:
    """Serve's services over a fresh state folder, without listeners or destinations
    (no sender exists, so nothing is ever queued in the outbox)."""
    segmentation = settings.segmentation.model_copy(update={"package": package})
    return open_services(PipelineSettings(
        storage=StorageSettings(root=state_root), routing=settings.routing,
        segmentation=segmentation, models=models or settings.models, wsi=settings.wsi,
        results=settings.results))


def oneshot_models(settings: OneShotSettings, models: Path | None) -> ModelsSettings:
    """The configured models with their packages looked up in the MAP model folder."""
    m = settings.models
    crc = m.crc.model_copy(update={"package": find_model_package(
        models, "crc-liver-metastasis", m.crc.package)})
    tsr = m.tsr.model_copy(update={"package": find_model_package(
        models, "pdac-tsr", m.tsr.package)})
    return m.model_copy(update={"crc": crc, "tsr": tsr})


class OneShotApp(Application):  # type: ignore[misc]
    """The one-shot graph over opened services: read ``input_dir``, write ``output_dir``."""

    def __init__(self, services: Services, input_dir: Path, output_dir: Path) -> None:
        self.services = services
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.source: FolderSourceOperator | None = None
        super().__init__([sys.executable, "oncopacs-oneshot"])

    def compose(self) -> None:
        self.source = FolderSourceOperator(
            self, BooleanCondition(self, name="stop"), name="folder_source",
            services=self.services, input_dir=self.input_dir, output_dir=self.output_dir)
        previous: Any = self.source
        for cls in STEPS:
            op = cls(self, name=cls.stage, services=self.services)
            self.add_flow(previous, op, {(OUT, IN)})
            previous = op
        sink = FolderSinkOperator(self, name=FolderSinkOperator.stage, services=self.services,
                                  output_dir=self.output_dir)
        self.add_flow(previous, sink, {(OUT, IN)})


def _run_graph(services: Services, paths: OneShotPaths) -> Intake:
    app = OneShotApp(services, paths.input, paths.output)
    app.scheduler(EventBasedScheduler(app, name="scheduler", worker_thread_number=2,
                                      stop_on_deadlock=True))
    app.run()
    source = app.source
    if source is None or source.intake is None:
        raise OneShotError(f"reading {paths.input} failed: "
                           f"{source.error if source else 'the graph did not start'}")
    return source.intake


def run_oneshot(paths: OneShotPaths, settings: OneShotSettings | None = None,
                ) -> dict[str, Any]:
    """Process every study in ``paths.input``; write results and ``report.json`` to
    ``paths.output``. Returns the report.

    Raises
    ------
    OneShotError
        If the input is not a folder, the output is not a folder, or the input could
        not be read.
    ConfigError
        If the configuration file is wrong.
    ml.seg.package.PackageError
        If the segmentation package cannot be loaded.
    """
    if not paths.input.is_dir():
        raise OneShotError(f"input path {paths.input} is not a folder")
    if paths.output.exists() and not paths.output.is_dir():
        raise OneShotError(f"output path {paths.output} exists and is not a folder")
    if settings is None:
        settings = load_oneshot_config(paths.config) if paths.config else OneShotSettings()
    package = find_seg_package(paths.models, settings.segmentation.package)
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    if paths.workdir is not None:
        paths.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oncopacs-oneshot-", dir=paths.workdir) as state:
        services = open_oneshot_services(settings, Path(state), package,
                                         oneshot_models(settings, paths.models))
        try:
            log.info("one-shot: input %s, output %s, segmentation package %s",
                     paths.input, paths.output, package)
            intake = _run_graph(services, paths)
            report = build_report(
                services.jobs, intake, paths.output, input=str(paths.input),
                output=str(paths.output), segmentation_package=str(package),
                started=started.isoformat(timespec="seconds"),
                seconds=round(time.perf_counter() - clock, 3))
            write_report(report, paths.output)
        finally:
            services.outbox.close()
            services.clinical.close()
            services.jobs.close()
    log.info("one-shot: %s", ", ".join(f"{k} {v}" for k, v in report["jobs"].items()))
    return report

