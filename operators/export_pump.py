"""Export pump: retries due items of the durable outbox until each destination accepts."""

from __future__ import annotations

import logging
import threading
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.context import Services
from app.pipeline import pump_outbox

log = logging.getLogger(__name__)


class ExportPumpOperator(Operator):  # type: ignore[misc]
    """A periodic operator without ports; a ``BooleanCondition`` named ``stop`` ends it."""

    def __init__(self, fragment: Fragment, *args: Any, services: Services,
                 stop_event: threading.Event, **kwargs: Any) -> None:
        self.services = services
        self.stop_event = stop_event
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        pass

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        if self.stop_event.is_set():
            self.conditions["stop"].disable_tick()
            return
        try:
            pump_outbox(self.services)
        except Exception:  # the pump must outlive a broken store read or peer
            log.exception("export pump failed; retrying on the next tick")
