"""Series selection and volume: reads the routed CT series into a HU volume."""

from app.pipeline import load_ct
from operators.base import JobOperator


class SeriesVolumeOperator(JobOperator):
    """Series selection and volume: reads the routed CT series into a HU volume."""

    stage = "volume"
    run = staticmethod(load_ct)
