"""Folder sink: the one-shot graph's last step; writes each job's results to the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment

from app.context import Services, StudyContext
from app.oneshot_intake import deliver_to_folder
from operators.base import JobOperator


class FolderSinkOperator(JobOperator):
    """Copies the SEG, SR and card of a job to ``output_dir/<StudyInstanceUID>/``; ends it."""

    stage = "folder_export"
    emits = False

    def __init__(self, fragment: Fragment, *args: Any, services: Services, output_dir: Path,
                 **kwargs: Any) -> None:
        self.output_dir = output_dir
        super().__init__(fragment, *args, services=services, **kwargs)

    def step(self, ctx: StudyContext) -> StudyContext | None:
        deliver_to_folder(self.services, ctx, self.output_dir)
        return None
