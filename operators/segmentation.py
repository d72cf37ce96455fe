"""Segmentation: liver, pancreas and tumour with the configured model package."""

from app.pipeline import segment_ct
from operators.base import JobOperator


class SegmentationOperator(JobOperator):
    """Segmentation: liver, pancreas and tumour with the configured model package."""

    stage = "segmentation"
    run = staticmethod(segment_ct)
