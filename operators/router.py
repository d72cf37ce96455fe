"""Router: picks pipeline A, B or none from the study's series and clinical context."""

from app.pipeline import route_job
from operators.base import JobOperator


class RouterOperator(JobOperator):
    """Router: picks pipeline A, B or none from the study's series and clinical context."""

    stage = "routing"
    run = staticmethod(route_job)
