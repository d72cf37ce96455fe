"""What every job operator shares: one input, one output, failures recorded per job.

A study job travels through the graph as one :class:`~app.context.StudyContext`.
Each operator receives it, calls one plain function, and emits it. An error in
one study never stops the graph: the job is marked failed with the error's
message, the stage duration is recorded, and nothing is emitted downstream.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.context import JobFailure, Services, StudyContext

log = logging.getLogger(__name__)

IN = "study"
OUT = "study"


class JobOperator(Operator):  # type: ignore[misc]
    """Base of the per-study operators: subclasses implement :meth:`step`."""

    stage: ClassVar[str] = "stage"
    emits: ClassVar[bool] = True
    """False for the last operator: an unconnected output would never let it tick."""
    run: ClassVar[staticmethod[[Services, StudyContext], StudyContext | None]]

    def __init__(self, fragment: Fragment, *args: Any, services: Services, **kwargs: Any):
        self.services = services
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(IN)
        if self.emits:
            spec.output(OUT)

    def step(self, ctx: StudyContext) -> StudyContext | None:
        """Do this operator's work; return the context to pass on, or None to end the job."""
        return type(self).run(self.services, ctx)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        ctx: StudyContext = op_input.receive(IN)
        started = time.perf_counter()
        try:
            result = self.step(ctx)
        except JobFailure as exc:
            self._fail(ctx, str(exc))
            return
        except Exception as exc:  # one broken study must not stop the service
            log.exception("job %s: %s failed", ctx.job_id, self.stage)
            self._fail(ctx, f"{self.stage}: {type(exc).__name__}: {exc}")
            return
        finally:
            seconds = time.perf_counter() - started
            ctx.timings[self.stage] = seconds
            self.services.metrics.stage_seconds.labels(stage=self.stage).observe(seconds)
        if result is not None and self.emits:
            op_output.emit(result, OUT)

    def _fail(self, ctx: StudyContext, reason: str) -> None:
        log.warning("job %s failed at %s: %s", ctx.job_id, self.stage, reason)
        for stage, seconds in ctx.timings.items():
            self.services.jobs.record_timing(ctx.job_id, stage, seconds)
        self.services.jobs.finish(ctx.job_id, "failed", reason)
