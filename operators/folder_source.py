"""Folder source: the one-shot graph's source; reads the input folder, then emits its jobs.

On its first tick it spools every DICOM instance of the input folder, ingests its HL7
files and queues one job per study (:func:`app.oneshot_intake.intake_folder`). Each
tick then emits the next queued job; when none is left, it disables its
``BooleanCondition`` named ``stop`` and the graph ends once the jobs in flight finish.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.context import Services, StudyContext
from app.oneshot_intake import Intake, intake_folder
from operators.base import OUT

log = logging.getLogger(__name__)


class FolderSourceOperator(Operator):  # type: ignore[misc]
    """Emits one :class:`StudyContext` per study found below ``input_dir`` (never reading
    below ``output_dir``).

    After the run, ``intake`` says what was read and left out; ``error`` is set (and
    ``intake`` is None) if the folder could not be read.
    """

    def __init__(self, fragment: Fragment, *args: Any, services: Services, input_dir: Path,
                 output_dir: Path | None = None, **kwargs: Any) -> None:
        self.services = services
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.intake: Intake | None = None
        self.error: str | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(OUT)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        if self.intake is None:
            try:
                self.intake = intake_folder(self.services, self.input_dir, self.output_dir)
            except Exception as exc:  # end the graph; the app reports the error
                log.exception("reading the input folder failed")
                self.error = f"{type(exc).__name__}: {exc}"
                self.conditions["stop"].disable_tick()
                return
        claimed = self.services.jobs.claim_next()
        if claimed is None:
            self.conditions["stop"].disable_tick()
            return
        op_output.emit(StudyContext(claimed.id, claimed.study_uid), OUT)
