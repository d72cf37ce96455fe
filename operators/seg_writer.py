"""SEG writer: one segment per structure, referencing the CT frames."""

from app.pipeline import write_seg
from operators.base import JobOperator


class SegWriterOperator(JobOperator):
    """SEG writer: one segment per structure, referencing the CT frames."""

    stage = "seg_writer"
    run = staticmethod(write_seg)
