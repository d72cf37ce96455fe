"""Model B (pipeline B): tumour-stroma ratio class from the arterial and venous CT."""

from app.model_steps import predict_tsr
from operators.base import JobOperator


class TsrModelOperator(JobOperator):
    """Model B (pipeline B): tumour-stroma ratio class from the arterial and venous CT."""

    stage = "model_b"
    run = staticmethod(predict_tsr)
