"""SR writer: Comprehensive 3D SR with TID 1500 (volumes, findings, references)."""

from app.pipeline import write_sr
from operators.base import JobOperator


class SrWriterOperator(JobOperator):
    """SR writer: Comprehensive 3D SR with TID 1500 (volumes, findings, references)."""

    stage = "sr_writer"
    run = staticmethod(write_sr)
