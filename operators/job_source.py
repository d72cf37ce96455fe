"""DICOM listener as the graph's source: turns complete studies into jobs and emits them.

Ticked by a ``PeriodicCondition``; a ``BooleanCondition`` named ``stop`` ends it
when the service shuts down. The listener itself (pynetdicom) receives on its
own threads; each tick closes quiet studies, queues them, and emits the oldest
queued job when the next operator can take it.
"""

from __future__ import annotations

import threading
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.context import Services, StudyContext
from app.dicom_listener import DicomListener
from operators.base import OUT


class JobSourceOperator(Operator):  # type: ignore[misc]
    """Polls the job store and emits one :class:`StudyContext` per claimed job."""

    def __init__(self, fragment: Fragment, *args: Any, services: Services,
                 listener: DicomListener, stop_event: threading.Event, **kwargs: Any) -> None:
        self.services = services
        self.listener = listener
        self.stop_event = stop_event
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(OUT)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        if self.stop_event.is_set():
            self.conditions["stop"].disable_tick()
            return
        jobs, metrics = self.services.jobs, self.services.metrics
        self.listener.poll_completed()
        for job in jobs.jobs("complete"):
            jobs.enqueue(job.id, "pending")
            metrics.studies_received.inc()
        metrics.set_job_counts(jobs.counts_by_state())
        claimed = jobs.claim_next()
        if claimed is not None:
            op_output.emit(StudyContext(claimed.id, claimed.study_uid), OUT)
