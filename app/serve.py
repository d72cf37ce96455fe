"""``oncopacs serve``: the long-running MONAI Deploy graph beside the PACS.

    dicom_listener (source) -> router -> volume -> segmentation -> wsi_fetch
        -> clinical_fields -> seg_writer -> sr_writer -> result_card -> pacs_export
    export_pump (periodic): retries the outbox until each destination accepts

The DICOM and HL7 listeners receive on their own threads; the graph runs under
Holoscan's ``EventBasedScheduler``. SIGTERM or SIGINT stops the sources; the
jobs in flight finish, and anything unfinished resumes at the next start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from holoscan.conditions import BooleanCondition, PeriodicCondition
from holoscan.schedulers import EventBasedScheduler
from monai.deploy.core import Application

from app.clinical import ClinicalStore
from app.config import PipelineSettings, ServeSettings
from app.context import Services
from app.dicom_listener import DicomListener
from app.export import Outbox, make_sender
from app.export_senders import DestinationSettings
from app.health import HealthServer, Metrics
from app.hl7_listener import Hl7Listener
from app.jobs import JobStore
from app.model_loading import load_crc_model, load_tsr_model
from app.results import ModelIdentity
from app.spool import Spool, make_dirs_durably
from ml.seg.package import load_package
from operators.attention_writer import AttentionWriterOperator
from operators.base import IN, OUT, JobOperator
from operators.clinical_fields import ClinicalFieldsOperator
from operators.crc_model import CrcModelOperator
from operators.export_pump import ExportPumpOperator
from operators.job_source import JobSourceOperator
from operators.pacs_export import PacsExportOperator
from operators.result_card import ResultCardOperator
from operators.router import RouterOperator
from operators.seg_writer import SegWriterOperator
from operators.segmentation import SegmentationOperator
from operators.series_volume import SeriesVolumeOperator
from operators.sr_writer import SrWriterOperator
from operators.tsr_model import TsrModelOperator
from operators.wsi_fetch import WsiFetchOperator

log = logging.getLogger(__name__)

CHAIN: tuple[type[JobOperator], ...] = (
    RouterOperator, SeriesVolumeOperator, SegmentationOperator, WsiFetchOperator,
    ClinicalFieldsOperator, CrcModelOperator, TsrModelOperator, SegWriterOperator,
    SrWriterOperator, ResultCardOperator, AttentionWriterOperator, PacsExportOperator)
EXPORT_PERIOD = dt.timedelta(seconds=1)


def open_services(settings: PipelineSettings,
                  destinations: Sequence[DestinationSettings] = ()) -> Services:
    """Open the stores and load the model packages (no network yet)."""
    storage = settings.storage
    make_dirs_durably(storage.root)
    make_dirs_durably(storage.results)
    package = load_package(settings.segmentation.package, settings.segmentation.label_map)
    demo = "synthetic" in package.name.lower() or "synthetic" in str(package.path).lower()
    return Services(
        settings=settings, spool=Spool(storage.spool), jobs=JobStore(storage.jobs_db),
        clinical=ClinicalStore(storage.clinical_db),
        outbox=Outbox(storage.outbox_db, settings.export), metrics=Metrics(),
        seg_package=package,
        seg_model=ModelIdentity(package.name, package.version, package.sha256, demo=demo),
        senders={d.name: make_sender(d) for d in destinations},
        crc_model=load_crc_model(settings.models.crc),
        tsr_model=load_tsr_model(settings.models.tsr))


class ServeApp(Application):  # type: ignore[misc]
    """The serve graph over already opened services and a started DICOM listener."""

    def __init__(self, settings: ServeSettings, services: Services, listener: DicomListener,
                 stop: threading.Event) -> None:
        self.settings = settings
        self.services = services
        self.listener = listener
        self.stop_event = stop
        super().__init__([sys.executable, "oncopacs-serve"])

    def compose(self) -> None:
        s = self.services
        period = dt.timedelta(seconds=self.settings.poll_interval_s)
        source = JobSourceOperator(
            self, PeriodicCondition(self, recess_period=period, name="poll"),
            BooleanCondition(self, name="stop"), name="dicom_listener", services=s,
            listener=self.listener, stop_event=self.stop_event)
        previous: Any = source
        for cls in CHAIN:
            op = cls(self, name=cls.stage, services=s)
            self.add_flow(previous, op, {(OUT, IN)})
            previous = op
        self.add_operator(ExportPumpOperator(
            self, PeriodicCondition(self, recess_period=EXPORT_PERIOD, name="pump_period"),
            BooleanCondition(self, name="stop"), name="export_pump", services=s,
            stop_event=self.stop_event))


@dataclass
class Running:
    """The started network side of the service."""

    services: Services
    dicom: DicomListener
    hl7: Hl7Listener
    http: HealthServer


def health(services: Services) -> dict[str, Any]:
    """The ``/healthz`` document: ok unless the job store is damaged."""
    integrity = services.jobs.integrity_check()
    return {"ok": integrity == "ok", "job_store": integrity,
            "jobs": services.jobs.counts_by_state(), "outbox": services.outbox.counts()}


@contextlib.contextmanager
def running(settings: ServeSettings) -> Iterator[Running]:
    """Open the services, resume unfinished jobs, start DICOM, HL7 and HTTP listeners."""
    services = open_services(settings, settings.destinations)
    resumed = services.jobs.resume()
    if resumed:
        log.info("resumed %d unfinished job(s)", len(resumed))
    metrics = services.metrics

    def on_status(status: int) -> None:
        if status == 0 or 0xB000 <= status <= 0xBFFF:
            metrics.instances_received.inc()
        else:
            metrics.instances_rejected.labels(reason=f"0x{status:04X}").inc()

    dicom = DicomListener(settings.dicom, services.spool, services.jobs,
                          on_status=on_status).start()
    hl7 = Hl7Listener(settings.hl7, services.clinical,
                      on_ack=lambda code: metrics.hl7_messages.labels(ack=code).inc()).start()
    http = HealthServer(settings.http.host, settings.http.port, services.metrics,
                        lambda: health(services)).start()
    try:
        yield Running(services, dicom, hl7, http)
    finally:
        http.stop()
        hl7.stop()
        dicom.stop()
        services.outbox.close()
        services.clinical.close()
        services.jobs.close()


def serve(settings: ServeSettings, stop: threading.Event | None = None) -> None:
    """Run the service until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with running(settings) as run:
        log.info("serving: DICOM %s@%s:%d, HL7 port %d, HTTP port %d",
                 settings.dicom.ae_title, settings.dicom.host, run.dicom.port, run.hl7.port,
                 run.http.port)
        app = ServeApp(settings, run.services, run.dicom, stop)
        app.scheduler(EventBasedScheduler(app, name="scheduler", worker_thread_number=2,
                                          stop_on_deadlock=True))
        app.run()
